"""The MCP gateway over HTTPS with mutual TLS (`mtls` among identity.sources): a real MCP client from
the SDK presenting an X.509-SVID → the gateway → a real MCP upstream built with the SDK.

Real SPIRE (tests/infra/spire.py) issues every credential in the first part: the sidecar's SVID and
bundles (this process's registration, DNS SAN `sidecar.local`), the callers' X.509-SVIDs and
JWT-SVIDs, another trust domain's SVIDs (a second SPIRE server, `other.test`, federated into the
sidecar's bundles but not accepted), and a rotating SVID (`-x509SVIDTTL 20`).

The second part uses the Workload API test double (tests/doubles/fake_workload_api.py) for
certificates SPIRE will not issue: a partner CA vouching for our trust domain, two URI SANs, a
client certificate that expires while its connection stays open; and a sidecar with no SVID yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import ssl
import tempfile
import uuid
from pathlib import Path
from typing import AsyncIterator

import httpx2
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from spiffe import X509Source

from sidecar.config import Config, load_config
from sidecar.mcp.tls import client_ssl_context
from tests.conftest import LOADED_MACHINE, write_policy
from tests.doubles.fake_workload_api import FakeWorkloadApi
from tests.doubles.identity_harness import fake_agent, remove_dir, short_dir
from tests.doubles.pki import TestCa
from tests.infra.spire import X509Svid
from tests.mcp_upstreams import Seen, docs_server, serve_http
from tests.test_spire_sidecar import (
    AUD,
    DELEGATION,
    ORCHESTRATOR_ID,
    PLANNER_ID,
    SIDECAR_DNS,
    SIDECAR_ID,
    TD,
    not_after,
    register_sidecar,
    start_spire,
    wait_for,
    wait_health,
)

OTHER_TD = "other.test"
STRANGER_ID = f"spiffe://{OTHER_TD}/ns/agents/sa/stranger"

# whoami is allowed to callers proven by a certificate or a token; the reason echoes what policy saw.
POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "obligations": {}, "reasons": [concat("|", [
        "seen", input.subject.spiffe_id, input.subject.source, input.subject.trust_domain])]} if {
        input.tool.name == "whoami"
        input.subject.source in {"mtls", "jwt_svid"}
    }
"""


# ---------------------------------------------------------------- helpers
def client_context(bundle_pem: bytes, chain_pem: bytes | None = None, key_pem: bytes | None = None) -> ssl.SSLContext:
    """An agent's TLS context: trusts the bundle for the gateway's certificate, presents an SVID if given.

    Python's ssl checks a server's hostname, not its SPIFFE ID; the gateway is reached at
    127.0.0.1, so the hostname check is off here and `presented_certificate` checks the ID.
    """
    context = ssl.create_default_context(cadata=bundle_pem.decode())
    context.check_hostname = False
    if chain_pem is not None:
        with tempfile.TemporaryDirectory() as directory:
            cert, key = os.path.join(directory, "svid.pem"), os.path.join(directory, "svid.key")
            Path(cert).write_bytes(chain_pem)
            Path(key).write_bytes(key_pem or b"")
            context.load_cert_chain(cert, key)
    return context


@contextlib.asynccontextmanager
async def agent(url: str, context: ssl.SSLContext, headers: dict[str, str] | None = None) -> AsyncIterator[Client]:
    """The SDK's MCP client over HTTPS with this TLS context."""
    async with httpx2.AsyncClient(verify=context, headers=headers or {}) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            yield client


def svid_agent(url: str, svid: X509Svid, headers: dict[str, str] | None = None):
    return agent(url, client_context(svid.bundle_pem, svid.chain_pem, svid.key_pem), headers)


def presented_certificate(url: str, context: ssl.SSLContext, server_hostname: str | None = None) -> x509.Certificate:
    """The certificate the gateway presents to a new TLS connection."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def uri_sans(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)


def decisions(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("evidence-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in out if r.get("kind") == "decision"]


async def refused_at_handshake(url: str, context: ssl.SSLContext) -> httpx2.TransportError:
    """POST to the gateway; the TLS handshake must fail (TLS 1.3 reports a refused client
    certificate on the client's first read, so this is a ReadError or a ConnectError)."""
    async with httpx2.AsyncClient(verify=context) as http:
        with pytest.raises(httpx2.TransportError) as info:
            await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    return info.value


def gateway_settings(directory: Path, spire_agent, upstream_url: str, **identity) -> Config:
    """A sidecar on `spire_agent`'s Workload API: gRPC on loopback and a unix socket, the gateway on
    loopback (HTTPS: mtls is among the sources), POLICY, evidence in `directory`."""
    sockets = Path(spire_agent.server.directory) / f"sc-{uuid.uuid4().hex[:8]}"  # unix paths stay short
    sockets.mkdir()
    return load_config(None, {
        "listen.tcp": "127.0.0.1:0",
        "listen.unix": str(sockets / "sidecar.sock"),
        "policy.dir": str(write_policy(directory / "policy", POLICY)),
        "policy.reload": False,
        "policy.timeout_ms": 5000,  # identity is under test, not policy speed on a loaded machine
        "evidence.dir": str(directory / "evidence"),
        "escalation.path": str(directory / "escalations.db"),
        "escalation.approvers": ["email:*@example.org"],
        "telemetry.exporter": "none",
        "identity.sources": ["jwt_svid", "mtls", "workload_api"],
        "identity.workload_api_socket": spire_agent.endpoint,
        "identity.jwt_audience": AUD,
        "identity.delegation_audience": DELEGATION,
        "identity.workload_api_max_backoff_ms": 200,
        **{f"identity.{k}": v for k, v in identity.items()},
        "mcp.listen": "127.0.0.1:0",
        "mcp.upstreams": {"docs": {"url": upstream_url}},
    })


# ---------------------------------------------------------------- real SPIRE
@pytest.fixture(scope="module")
def other(spire):
    """A second SPIRE (trust domain other.test) with a workload `stranger`, federated into sidecar.test."""
    server = start_spire(OTHER_TD)
    far = server.agent("far")
    stranger = far.workload("stranger")
    far.register(STRANGER_ID.removeprefix(f"spiffe://{OTHER_TD}"), *stranger.selectors)
    stranger.wait_for_identity()
    spire.trust(server)  # SPIRE then hands the sidecar other.test's X.509 bundle too
    yield server, stranger
    server.close()


@pytest.fixture(scope="module")
def node(spire, other):
    spire_agent = spire.agent("mcp")
    register_sidecar(spire_agent, federates_with=(OTHER_TD,))
    callers = {}
    for name, spiffe_id in (("planner", PLANNER_ID), ("orchestrator", ORCHESTRATOR_ID)):
        callers[name] = spire_agent.workload(name)
        spire_agent.register(spiffe_id.removeprefix(f"spiffe://{TD}"), *callers[name].selectors)
    for workload in callers.values():
        workload.wait_for_identity()
    return spire_agent, callers


@pytest.fixture
async def upstream():
    seen = Seen()
    served = await serve_http(docs_server(seen))
    yield served, seen
    await served.stop()


@pytest.fixture
async def gateway(node, upstream, tmp_path, running_sidecar):
    spire_agent, callers = node
    sidecar = await running_sidecar(gateway_settings(tmp_path, spire_agent, upstream[0].url))
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
    return sidecar, callers, upstream[1], tmp_path / "evidence"


async def test_a_caller_is_identified_by_its_spire_x509_svid(gateway):
    sidecar, callers, seen, evidence = gateway
    assert sidecar.mcp.url.startswith("https://127.0.0.1:")
    svid = callers["planner"].fetch_x509()
    async with svid_agent(sidecar.mcp.url, svid) as client:
        listed = {t.name for t in (await client.list_tools()).tools}
        result = await client.call_tool("docs__whoami", {})
    assert "docs__whoami" in listed and "docs__search" not in listed  # the list phase saw the caller too
    assert not result.is_error, result
    assert seen.calls == [("whoami", {})]
    record = decisions(evidence)[-1]
    assert record["outcome"] == "allow"
    assert record["reasons"] == [f"seen|{PLANNER_ID}|mtls|{TD}"]  # what policy saw
    assert record["subject"] == {"spiffe_id": PLANNER_ID, "source": "mtls", "svid_expires_at": not_after(svid.chain_pem)}

    # The gateway presents the sidecar's SPIRE SVID, with the DNS SAN a hostname-checking client can use.
    checking = client_context(svid.bundle_pem, svid.chain_pem, svid.key_pem)
    checking.check_hostname = True
    served = await asyncio.to_thread(presented_certificate, sidecar.mcp.url, checking, SIDECAR_DNS)
    assert uri_sans(served) == [SIDECAR_ID]


async def test_no_client_certificate_or_plain_http_is_refused_before_any_call(gateway, caplog):
    sidecar, callers, seen, evidence = gateway
    bundle = callers["planner"].fetch_x509().bundle_pem
    await refused_at_handshake(sidecar.mcp.url, client_context(bundle))
    assert any("MCP gateway: TLS handshake refused:" in r.getMessage() and "CERTIFICATE" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    async with httpx2.AsyncClient() as http:  # plain HTTP to the TLS port: no fallback
        with pytest.raises(httpx2.TransportError):
            await http.post(sidecar.mcp.url.replace("https://", "http://"), json={})
    assert not seen.calls and decisions(evidence) == []  # nothing reached policy or the tool


async def test_an_svid_of_another_trust_domain_is_refused_and_accepted_once_configured(
    node, other, upstream, tmp_path, running_sidecar
):
    spire_agent, callers = node
    _, stranger = other
    own_bundle = callers["planner"].fetch_x509().bundle_pem
    foreign = stranger.fetch_x509()
    as_stranger = client_context(own_bundle, foreign.chain_pem, foreign.key_pem)  # trusts the sidecar by its own bundle

    # Only the sidecar's trust domain is accepted: other.test's bundle reached the sidecar (federation)
    # but is not among the client CAs, so the handshake fails.
    sidecar = await running_sidecar(gateway_settings(tmp_path / "own", spire_agent, upstream[0].url))
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
    assert OTHER_TD in sidecar.identity_runtime.source.x509().bundles
    await refused_at_handshake(sidecar.mcp.url, as_stranger)
    async with svid_agent(sidecar.mcp.url, callers["planner"].fetch_x509()) as client:  # still serving its own
        assert not (await client.call_tool("docs__whoami", {})).is_error
    assert [r["subject"]["spiffe_id"] for r in decisions(tmp_path / "own" / "evidence")] == [PLANNER_ID]

    # identity.trust_domains lists other.test: its SVID gets in, as itself.
    sidecar = await running_sidecar(
        gateway_settings(tmp_path / "both", spire_agent, upstream[0].url, trust_domains=[TD, OTHER_TD]))
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
    async with agent(sidecar.mcp.url, as_stranger) as client:
        assert not (await client.call_tool("docs__whoami", {})).is_error
    record = decisions(tmp_path / "both" / "evidence")[-1]
    assert record["reasons"] == [f"seen|{STRANGER_ID}|mtls|{OTHER_TD}"]


async def test_a_bearer_jwt_svid_must_name_the_certificate_s_caller(gateway):
    sidecar, callers, seen, evidence = gateway
    svid = callers["planner"].fetch_x509()
    someone_else = callers["orchestrator"].fetch_jwt(AUD)
    async with svid_agent(sidecar.mcp.url, svid, {"authorization": f"Bearer {someone_else}"}) as client:
        with pytest.raises(MCPError) as info:
            await client.list_tools()
        result = await client.call_tool("docs__whoami", {})
    mismatch = f"jwt_svid and mtls name different callers ({ORCHESTRATOR_ID} and {PLANNER_ID})"
    assert mismatch in str(info.value)
    assert result.is_error and mismatch in result.content[0].text
    assert not seen.calls
    record = decisions(evidence)[-1]
    assert record["outcome"] == "deny" and record["subject"] is None
    assert record["reasons"][0].startswith("unverified_caller: ") and mismatch in record["reasons"][0]

    # The planner's own token with the planner's certificate: one caller, decided by the token (listed first).
    own = callers["planner"].fetch_jwt(AUD)
    async with svid_agent(sidecar.mcp.url, svid, {"authorization": f"Bearer {own}"}) as client:
        assert not (await client.call_tool("docs__whoami", {})).is_error
    assert decisions(evidence)[-1]["reasons"] == [f"seen|{PLANNER_ID}|jwt_svid|{TD}"]


async def test_the_agent_side_context_from_a_py_spiffe_x509source(node, gateway):
    """`client_ssl_context` in this process: SPIRE gives it the sidecar's own registration (SIDECAR_ID)."""
    spire_agent, _ = node
    sidecar, _, _, evidence = gateway
    source = await asyncio.to_thread(X509Source, socket_path=spire_agent.endpoint, timeout_in_seconds=10)
    try:
        context = client_ssl_context(source)
    finally:
        source.close()
    # It checks the gateway's hostname against the SVID's DNS SAN ...
    assert context.check_hostname
    served = await asyncio.to_thread(presented_certificate, sidecar.mcp.url, context, SIDECAR_DNS)
    assert uri_sans(served) == [SIDECAR_ID]
    # ... and presents this process's SVID (reached at 127.0.0.1 here, so without the hostname check).
    context.check_hostname = False
    async with agent(sidecar.mcp.url, context) as client:
        assert not (await client.call_tool("docs__whoami", {})).is_error
    assert decisions(evidence)[-1]["reasons"] == [f"seen|{SIDECAR_ID}|mtls|{TD}"]


async def test_new_connections_get_the_rotated_svid_without_a_restart(spire, upstream, tmp_path, running_sidecar):
    """`-x509SVIDTTL 14`: SPIRE rotates the sidecar's and the planner's SVIDs 0.8-3.2 s after issuing
    them (24 s with the 10 s backdate; rotated at a jittered half; tests/test_spire_rotation.py)."""
    rotating = spire.agent("mcp-rotating")
    register_sidecar(rotating, x509_ttl=14)
    planner = rotating.workload("planner")
    rotating.register(PLANNER_ID.removeprefix(f"spiffe://{TD}"), *planner.selectors, x509_ttl=14)
    first_svid = planner.wait_for_identity()
    sidecar = await running_sidecar(gateway_settings(tmp_path, rotating, upstream[0].url))
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
    context = client_context(first_svid.bundle_pem, first_svid.chain_pem, first_svid.key_pem)
    before = await asyncio.to_thread(presented_certificate, sidecar.mcp.url, context)
    assert uri_sans(before) == [SIDECAR_ID]

    async def rotated():
        served = await asyncio.to_thread(presented_certificate, sidecar.mcp.url, context)
        return served if served.serial_number != before.serial_number else None

    after = await wait_for(rotated, "a new connection to get the sidecar's rotated SVID")
    assert uri_sans(after) == [SIDECAR_ID] and after.not_valid_after_utc > before.not_valid_after_utc

    # The planner's own rotated SVID is accepted over a new connection, with its new expiry.
    async def planner_rotated():
        svid = planner.fetch_x509()
        return svid if svid.chain_pem != first_svid.chain_pem else None

    second_svid = await wait_for(planner_rotated, "the planner's SVID to rotate")
    async with svid_agent(sidecar.mcp.url, second_svid) as client:
        assert not (await client.call_tool("docs__whoami", {})).is_error
    record = decisions(tmp_path / "evidence")[-1]
    assert record["subject"] == {"spiffe_id": PLANNER_ID, "source": "mtls",
                                 "svid_expires_at": not_after(second_svid.chain_pem)}


# ---------------------------------------------------------------- the Workload API test double
PARTNER_TD = "partner.org"


@pytest.fixture
async def partnered(tmp_path, running_sidecar, upstream):
    """The sidecar (example.org, double) accepting example.org and partner.org, whose CA has an intermediate."""
    sockdir = short_dir()
    api = fake_agent(sockdir, path="/ns/agents/sa/sidecar")
    partner = TestCa(PARTNER_TD, intermediate=True)
    api.federate_with(PARTNER_TD, ca=partner)
    sidecar = await running_sidecar(double_settings(tmp_path, api, upstream[0].url, [api.trust_domain, PARTNER_TD]))
    await wait_serving(sidecar)
    yield sidecar, api, partner, tmp_path / "evidence"
    api.stop()
    remove_dir(sockdir)


def double_settings(directory: Path, api, upstream_url: str, trust_domains: list[str]) -> Config:
    return load_config(None, {
        **LOADED_MACHINE,  # room for a loaded machine: identity is under test, not policy speed
        "listen.tcp": "127.0.0.1:0",
        "policy.dir": str(write_policy(directory / "policy", POLICY)),
        "policy.reload": False,
        "evidence.dir": str(directory / "evidence"),
        "escalation.approvers": ["email:*@example.org"],
        "telemetry.exporter": "none",
        "identity.sources": ["mtls"],
        "identity.workload_api_socket": api.endpoint,
        "identity.trust_domains": trust_domains,
        "identity.workload_api_max_backoff_ms": 200,
        "mcp.listen": "127.0.0.1:0",
        "mcp.upstreams": {"docs": {"url": upstream_url}},
    })


async def wait_serving(sidecar) -> None:
    await wait_for(lambda: asyncio.sleep(0, sidecar.identity.health()[0]), "the sidecar's SVID")


def double_context(api, svid) -> ssl.SSLContext:
    return client_context(api.ca.bundle_pem(), svid.chain_pem(), svid.key_pem())


async def test_a_chain_through_an_intermediate_ca_is_verified_as_tls_built_it(partnered):
    sidecar, api, partner, evidence = partnered
    svid = partner.issue("/ns/agents/sa/partner-agent")  # leaf, then the intermediate
    async with agent(sidecar.mcp.url, double_context(api, svid)) as client:
        assert not (await client.call_tool("docs__whoami", {})).is_error
    assert decisions(evidence)[-1]["reasons"] == [f"seen|spiffe://{PARTNER_TD}/ns/agents/sa/partner-agent|mtls|{PARTNER_TD}"]


@pytest.mark.parametrize("forged, reason", [
    # TLS trusts the union of the accepted bundles; the partner's CA must not vouch for example.org.
    ("partner-ca-for-our-domain", "does not chain to that trust domain's X.509 bundle"),
    ("two-uri-sans", "an X.509-SVID has exactly one URI SAN; this certificate has 2"),
    ("upper-case-trust-domain", "is not a valid SPIFFE ID"),
])
async def test_certificates_tls_accepts_but_that_are_no_svid_of_their_caller_are_denied_and_recorded(
    partnered, forged, reason
):
    sidecar, api, partner, evidence = partnered
    if forged == "partner-ca-for-our-domain":
        svid = partner.issue(spiffe_id="spiffe://example.org/ns/agents/sa/planner")
    elif forged == "two-uri-sans":
        svid = api.ca.issue(uris=["spiffe://example.org/ns/agents/sa/a", "spiffe://example.org/ns/agents/sa/b"])
    else:
        svid = api.ca.issue(uris=["spiffe://Example.org/ns/agents/sa/planner"])
    async with agent(sidecar.mcp.url, double_context(api, svid)) as client:
        with pytest.raises(MCPError) as info:
            await client.list_tools()
        result = await client.call_tool("docs__whoami", {})
    assert "unverified_caller: mtls: " in str(info.value) and reason in str(info.value)
    assert result.is_error and reason in result.content[0].text
    record = decisions(evidence)[-1]
    assert record["outcome"] == "deny" and record["subject"] is None
    assert record["reasons"][0].startswith("unverified_caller: mtls: ") and reason in record["reasons"][0]

    # The gateway keeps serving a proper SVID.
    async with agent(sidecar.mcp.url, double_context(api, api.ca.issue("/ns/agents/sa/planner"))) as client:
        assert not (await client.call_tool("docs__whoami", {})).is_error


async def test_a_client_certificate_that_expires_on_an_open_connection_is_denied(partnered):
    sidecar, api, _, evidence = partnered
    svid = api.ca.issue("/ns/agents/sa/planner", ttl=2)
    async with agent(sidecar.mcp.url, double_context(api, svid)) as client:
        assert not (await client.call_tool("docs__whoami", {})).is_error
        await asyncio.sleep(max(0.0, (svid.cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 1)
        result = await client.call_tool("docs__whoami", {})  # the same keep-alive connection
    assert result.is_error and "expired at" in result.content[0].text
    assert "while its connection stayed open" in decisions(evidence)[-1]["reasons"][0]


async def test_an_expired_client_certificate_is_refused_at_the_handshake(partnered, caplog):
    sidecar, api, _, evidence = partnered
    expired = api.ca.issue("/ns/agents/sa/planner", ttl=-60)
    await refused_at_handshake(sidecar.mcp.url, double_context(api, expired))
    assert any("TLS handshake refused" in r.getMessage() and "certificate has expired" in r.getMessage()
               for r in caplog.records), caplog.text
    assert decisions(evidence) == []


async def test_a_session_opened_by_one_certificate_does_not_lend_its_caller_to_another(partnered):
    """The caller is resolved per request from that request's connection, never from the MCP session."""
    sidecar, api, _, evidence = partnered
    headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-06-18"}
    planner = double_context(api, api.ca.issue("/ns/agents/sa/planner"))
    intruder = double_context(api, api.ca.issue("/ns/agents/sa/intruder"))
    async with httpx2.AsyncClient(verify=planner, headers=headers) as http:
        opened = await http.post(sidecar.mcp.url, json={
            "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "planner", "version": "1"}}})
        session = opened.headers["mcp-session-id"]
        await http.post(sidecar.mcp.url, headers={"mcp-session-id": session},
                        json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    async with httpx2.AsyncClient(verify=intruder, headers={**headers, "mcp-session-id": session}) as http:
        answer = await http.post(sidecar.mcp.url, json={
            "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "docs__whoami", "arguments": {}}})
    assert answer.status_code == 200, answer.text
    record = decisions(evidence)[-1]
    assert record["subject"]["spiffe_id"] == "spiffe://example.org/ns/agents/sa/intruder"
    assert record["subject"]["source"] == "mtls"


async def test_a_withdrawn_sidecar_identity_denies_every_call_with_the_reason(partnered):
    """The TLS context stays (as grpc's does), and the mtls resolver denies each call and records it."""
    sidecar, api, _, evidence = partnered
    context = double_context(api, api.ca.issue("/ns/agents/sa/planner"))
    async with agent(sidecar.mcp.url, context) as client:
        assert not (await client.call_tool("docs__whoami", {})).is_error
    api.withdraw()
    await wait_for(lambda: asyncio.sleep(0, not sidecar.identity.health()[0]), "the withdrawal to reach the sidecar")
    async with agent(sidecar.mcp.url, context) as client:
        result = await client.call_tool("docs__whoami", {})
    assert result.is_error and "unverified_caller: mtls: " in result.content[0].text
    record = decisions(evidence)[-1]
    assert record["outcome"] == "deny" and record["subject"] is None
    assert "withdrew the sidecar's identity" in record["reasons"][0]


async def test_before_the_first_svid_every_handshake_fails_then_the_svid_is_served(
    tmp_path, running_sidecar, upstream, caplog
):
    sockdir = short_dir()
    api = FakeWorkloadApi(os.path.join(sockdir, "agent.sock")).start()  # no identity issued yet
    try:
        sidecar = await running_sidecar(double_settings(tmp_path, api, upstream[0].url, []))
        caller = api.ca.issue("/ns/agents/sa/planner")
        await refused_at_handshake(sidecar.mcp.url, double_context(api, caller))
        assert any("TLS handshake refused" in r.getMessage() and "no certificate to present" in r.getMessage()
                   for r in caplog.records), caplog.text
        own = api.set_identity("/ns/agents/sa/sidecar")[0]
        await wait_serving(sidecar)
        served = await asyncio.to_thread(presented_certificate, sidecar.mcp.url, double_context(api, caller))
        assert served.serial_number == own.serial
        async with agent(sidecar.mcp.url, double_context(api, caller)) as client:
            assert not (await client.call_tool("docs__whoami", {})).is_error
    finally:
        api.stop()
        remove_dir(sockdir)
