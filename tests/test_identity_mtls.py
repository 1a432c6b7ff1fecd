"""`mtls`: the sidecar serves gRPC over mutual TLS with its SVID; the subject is the client's.

Real grpc.aio servers on loopback, certificates from the test CA the fake
Workload API hands out (tests/doubles), py-spiffe on the client side. mTLS
with SPIRE-issued SVIDs (the subject, no client certificate, rotation of the
server certificate, serving before the SVID, another trust domain) is tested
against the real SPIRE in tests/test_spire_*.py; here are the certificates
SPIRE will not issue (another CA, expired, malformed SANs, a partner CA
vouching for our trust domain, a 1-second lifetime) and the resolver's own checks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import X509Source

from sidecar.identity import IdentityError, PeerInfo
from sidecar.identity.mtls import MtlsResolver, SvidServerCredentials, x509_source_channel_credentials
from sidecar.identity.workload_api import WorkloadApiSource
from tests.doubles.identity_harness import (
    METHOD,
    SIDECAR_DNS,
    ProbeServer,
    ask,
    client_credentials,
    fake_agent,
    remove_dir,
    short_dir,
)
from tests.doubles.pki import TestCa

SIDECAR_PATH = "/ns/agents/sa/sidecar"
PEM = Encoding.PEM


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Env:
    def __init__(self, directory, agent, source, creds, probe):
        self.dir, self.agent, self.source, self.creds, self.probe = directory, agent, source, creds, probe

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.probe.tls_port}"

    def client(self, svid, bundle: bytes | None = None) -> grpc.ChannelCredentials:
        return client_credentials(svid, bundle or self.agent.ca.bundle_pem())

    async def call(self, svid, **kw) -> dict:
        return await ask(self.target, credentials=self.client(svid), **kw)


async def start_env(trust_domains=(), ca: TestCa | None = None, identity: bool = True) -> Env:
    directory = short_dir()
    agent = fake_agent(directory, path=SIDECAR_PATH, ca=ca) if identity else None
    if agent is None:
        from tests.doubles.fake_workload_api import FakeWorkloadApi

        agent = FakeWorkloadApi(f"{directory}/agent.sock", ca=ca).start()
        agent.dns_names = (SIDECAR_DNS,)
    source = WorkloadApiSource(agent.endpoint, jwt_bundles=False, backoff_initial=0.02, backoff_max=0.1).start()
    if identity:
        assert source.wait_until_ready(30)
    creds = SvidServerCredentials(source, trust_domains)
    probe = await ProbeServer(MtlsResolver(source, trust_domains), directory).start(creds.credentials())
    return Env(directory, agent, source, creds, probe)


async def stop_env(env: Env) -> None:
    await env.probe.stop()
    env.source.close()
    env.agent.stop()
    remove_dir(env.dir)


@pytest.fixture
async def env():
    e = await start_env()
    yield e
    await stop_env(e)


async def assert_refused_at_handshake(env: Env, creds: grpc.ChannelCredentials) -> None:
    calls = env.probe.calls
    with pytest.raises(grpc.RpcError) as info:
        await ask(env.target, credentials=creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert env.probe.calls == calls  # never reached the servicer


async def assert_alive(env: Env) -> None:
    good = env.agent.ca.issue("/ns/agents/sa/probe")
    assert (await env.call(good))["subject"]["spiffe_id"] == "spiffe://example.org/ns/agents/sa/probe"


# ---------------------------------------------------------------- good callers


async def test_client_with_an_x509_source_and_intermediate_ca():
    ca = TestCa("example.org", intermediate=True)
    env = await start_env(ca=ca)
    try:
        client_agent = fake_agent(env.dir, "client.sock", path="/ns/agents/sa/planner", ca=ca)
        with X509Source(socket_path=client_agent.endpoint, timeout_in_seconds=5) as x509_source:
            creds = x509_source_channel_credentials(x509_source)
            reply = await ask(env.target, credentials=creds)
        assert reply["subject"]["spiffe_id"] == "spiffe://example.org/ns/agents/sa/planner"
        client_agent.stop()
    finally:
        await stop_env(env)


async def test_python_client_needs_the_dns_name_override(env):
    # grpc's Python client checks the server's hostname, never its SPIFFE ID.
    channel = grpc.aio.secure_channel(env.target, env.client(env.agent.ca.issue("/agent")))
    with pytest.raises(grpc.RpcError) as info:
        await channel.unary_unary(METHOD)(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()


# ---------------------------------------------------------------- bad certificates


async def test_certificate_from_another_ca_is_refused_at_handshake(env):
    rogue = TestCa("example.org").issue("/ns/agents/sa/planner")  # same ID, untrusted CA
    await assert_refused_at_handshake(env, env.client(rogue))
    await assert_alive(env)


async def test_expired_certificate_is_refused_at_handshake(env):
    expired = env.agent.ca.issue("/agent", ttl=-10, not_before=utc_now() - dt.timedelta(hours=1))
    await assert_refused_at_handshake(env, env.client(expired))
    await assert_alive(env)


@pytest.mark.parametrize(
    "authority",
    [{"ca": True, "key_cert_sign": True}, {"ca": False, "key_cert_sign": True}, {"ca": False, "crl_sign": True},
     {"ca": None, "key_cert_sign": True}],
    ids=["ca", "key-cert-sign", "crl-sign", "key-cert-sign-without-basic-constraints"],
)
async def test_a_certificate_that_can_sign_certificates_is_not_a_leaf(env, authority):
    """X.509-SVID spec 4.3: a leaf is not a CA and sets neither keyCertSign nor cRLSign. Only basic
    constraints CA:TRUE was refused; a client certificate with keyCertSign or cRLSign (with CA:FALSE, or
    without basic constraints) was taken as a caller."""
    reply = await env.call(env.agent.ca.issue("/ns/spire/nested", **authority))
    assert "subject" not in reply, reply
    assert reply["denied"].startswith("mtls: client certificate: an X.509-SVID leaf must not "), reply
    await assert_alive(env)


@pytest.mark.parametrize(
    "uris, reason",
    [
        (["spiffe://example.org/a", "spiffe://example.org/b"], "exactly one URI SAN; this certificate has 2"),
        ([], "exactly one URI SAN; this certificate has 0"),
        (["spiffe://Example.org/agent"], "not a valid SPIFFE ID"),
        (["spiffe://example.org/" + "a" * 2100], "longer than 2048 bytes"),
        (["spiffe://example.org"], "names only a trust domain"),
        (["https://example.org/agent"], "not a valid SPIFFE ID"),
    ],
    ids=["two-uri-sans", "no-uri-san", "upper-case", "over-long", "trust-domain-only", "not-spiffe"],
)
async def test_malformed_svids_are_denied_with_a_reason(env, uris, reason):
    odd = env.agent.ca.issue(uris=uris)
    reply = await env.call(odd)
    assert "subject" not in reply
    assert reply["denied"].startswith("mtls: client certificate: ")
    assert reason in reply["denied"]
    await assert_alive(env)


async def test_foreign_trust_domain_refused_unless_accepted():
    partner = TestCa("partner.example")
    # Default: only the sidecar's own trust domain is in the root pool.
    env = await start_env()
    try:
        env.agent.federate_with("partner.example", ca=partner)
        # the sidecar holds the partner's bundle (not: 0.2 s passed), so the refusal below is the
        # root pool's doing and not a bundle that had not arrived yet
        assert await_until(lambda: "partner.example" in env.source.x509().bundles)
        await assert_refused_at_handshake(env, client_credentials(partner.issue("/agent"), env.agent.ca.bundle_pem()))
    finally:
        await stop_env(env)
    # Accepted by config: the partner's callers get their own SPIFFE ID ...
    env = await start_env(trust_domains=("example.org", "partner.example"))
    try:
        env.agent.federate_with("partner.example", ca=partner)
        assert await_until(lambda: "partner.example" in env.source.x509().bundles)
        reply = await ask(env.target, credentials=client_credentials(partner.issue("/agent"), env.agent.ca.bundle_pem()))
        assert reply["subject"]["spiffe_id"] == "spiffe://partner.example/agent"
        assert reply["subject"]["trust_domain"] == "partner.example"
        # ... but the partner's CA cannot vouch for our trust domain's IDs.
        spoof = partner.issue(spiffe_id="spiffe://example.org/ns/agents/sa/admin")
        reply = await ask(env.target, credentials=client_credentials(spoof, env.agent.ca.bundle_pem()))
        assert "does not chain to that trust domain's X.509 bundle" in reply["denied"]
    finally:
        await stop_env(env)


def await_until(predicate, timeout: float = 30.0) -> bool:  # returns as soon as it holds; 30 s for a loaded machine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except Exception:
            pass
        time.sleep(0.02)
    return False


def test_resolver_checks_what_grpc_does_not(tmp_path):
    """Direct resolver checks on a synthetic auth context (what grpc would hand over)."""
    directory = short_dir()
    agent = fake_agent(directory, path=SIDECAR_PATH)
    source = WorkloadApiSource(agent.endpoint, jwt_bundles=False).start()
    try:
        assert source.wait_until_ready(30)
        resolver = MtlsResolver(source)
        client = agent.ca.issue("/agent")

        def peer(spiffe_ids, svid=client, transport="tls"):
            return PeerInfo(transport=transport, auth_context={
                "x509_pem_cert": (svid.cert.public_bytes(PEM),),
                "x509_pem_cert_chain": (svid.chain_pem(),),
                "peer_spiffe_id": tuple(s.encode() for s in spiffe_ids),
            })

        assert resolver.resolve(peer(["spiffe://example.org/agent"])).subject.source == "mtls"
        with pytest.raises(IdentityError, match="verified SPIFFE ID"):
            resolver.resolve(peer(["spiffe://example.org/other"]))
        with pytest.raises(IdentityError, match="verified SPIFFE ID"):
            resolver.resolve(peer([]))
        with pytest.raises(IdentityError, match="did not come over mutual TLS"):
            resolver.resolve(peer(["spiffe://example.org/agent"], transport="unix"))
        with pytest.raises(IdentityError, match="no client certificate"):
            resolver.resolve(PeerInfo(transport="tls"))
        foreign = TestCa("other.org").issue("/agent")
        with pytest.raises(IdentityError, match="trust domain 'other.org' is not accepted"):
            resolver.resolve(peer(["spiffe://other.org/agent"], svid=foreign))
        # The sidecar's own SVID withdrawn: nobody is verified.
        agent.withdraw()
        assert await_until(lambda: not source.health()[0])
        with pytest.raises(IdentityError, match="withdrew"):
            resolver.resolve(peer(["spiffe://example.org/agent"]))
    finally:
        source.close()
        agent.stop()
        remove_dir(directory)


def test_resolver_rechecks_what_can_change_between_calls_on_one_connection():
    """The checks that depend only on a certificate's bytes run once for it; the rest on every call.

    A verdict is kept per certificate, grpc's verified SPIFFE ID and held SVID version: another grpc
    verdict on the same certificate, the certificate's validity period at each call, and new bundles
    are never answered from an earlier call's verdict."""
    directory = short_dir()
    agent = fake_agent(directory, path=SIDECAR_PATH)
    source = WorkloadApiSource(agent.endpoint, jwt_bundles=False).start()
    try:
        assert source.wait_until_ready(30)
        now = [utc_now()]
        resolver = MtlsResolver(source, ("example.org", "partner.example"), clock=lambda: now[0])
        client = agent.ca.issue("/agent", ttl=600)

        def peer(spiffe_ids, svid=client):
            return PeerInfo(transport="tls", auth_context={
                "x509_pem_cert": (svid.cert.public_bytes(PEM),),
                "x509_pem_cert_chain": (svid.chain_pem(),),
                "peer_spiffe_id": tuple(s.encode() for s in spiffe_ids),
            })

        accepted = resolver.resolve(peer(["spiffe://example.org/agent"]))
        assert accepted.subject.spiffe_id == "spiffe://example.org/agent"
        # The same certificate with another verdict from grpc is refused, then accepted again.
        with pytest.raises(IdentityError, match="verified SPIFFE ID"):
            resolver.resolve(peer(["spiffe://example.org/other"]))
        with pytest.raises(IdentityError, match="verified SPIFFE ID"):
            resolver.resolve(peer(["spiffe://example.org/agent", "spiffe://example.org/agent"]))
        assert resolver.resolve(peer(["spiffe://example.org/agent"])) == accepted
        # The validity period is checked at each call.
        not_after, not_before = client.cert.not_valid_after_utc, client.cert.not_valid_before_utc
        now[0] = not_after
        with pytest.raises(IdentityError, match="expired at"):
            resolver.resolve(peer(["spiffe://example.org/agent"]))
        now[0] = not_before - dt.timedelta(seconds=1)
        with pytest.raises(IdentityError, match="not valid before"):
            resolver.resolve(peer(["spiffe://example.org/agent"]))
        now[0] = utc_now()
        assert resolver.resolve(peer(["spiffe://example.org/agent"])) == accepted
        # A refusal for want of a bundle does not outlive the bundle's arrival (a new SVID version).
        partner_ca = TestCa("partner.example")
        partner_peer = peer(["spiffe://partner.example/agent"], svid=partner_ca.issue("/agent"))
        with pytest.raises(IdentityError, match="does not chain"):
            resolver.resolve(partner_peer)
        agent.federate_with("partner.example", ca=partner_ca)
        assert await_until(lambda: "partner.example" in source.x509().bundles)
        assert resolver.resolve(partner_peer).subject.spiffe_id == "spiffe://partner.example/agent"
    finally:
        source.close()
        agent.stop()
        remove_dir(directory)


# ---------------------------------------------------------------- rotation and expiry


async def test_client_certificate_not_accepted_after_expiry(env):
    short = env.agent.ca.issue("/ns/agents/sa/short", ttl=1.0)
    channel = grpc.aio.secure_channel(env.target, env.client(short),
                                      options=[("grpc.ssl_target_name_override", SIDECAR_DNS)])
    try:
        import json

        first = json.loads(await channel.unary_unary(METHOD)(b"", timeout=5))
        assert first["subject"]["spiffe_id"] == "spiffe://example.org/ns/agents/sa/short"
        delay = (short.cert.not_valid_after_utc - utc_now()).total_seconds() + 1.1
        await asyncio.sleep(max(delay, 0))
        # The open connection outlived the certificate: denied per call.
        again = json.loads(await channel.unary_unary(METHOD)(b"", timeout=5))
        assert "expired at" in again["denied"] and "reconnect with a fresh SVID" in again["denied"]
    finally:
        await channel.close()
    # A new connection with it fails the handshake.
    await assert_refused_at_handshake(env, env.client(short))
    # Its rotated successor is accepted.
    fresh = env.agent.ca.issue("/ns/agents/sa/short")
    assert (await env.call(fresh))["subject"]["spiffe_id"] == "spiffe://example.org/ns/agents/sa/short"


async def test_no_bundle_for_the_accepted_trust_domains_trusts_nobody():
    # Never an empty root pool: grpc would fall back to the system's public CAs.
    env = await start_env(trust_domains=("nobody.example",))
    try:
        await assert_refused_at_handshake(env, env.client(env.agent.ca.issue("/agent")))
    finally:
        await stop_env(env)
