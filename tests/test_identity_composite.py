"""Several identity sources with one precedence, delegation chains, and build_identity from config."""

from __future__ import annotations

import time

import pytest

from sidecar.config import ConfigError, load_config
from sidecar.identity import IdentityError, PeerInfo
from sidecar.identity.composite import CompositeResolver
from sidecar.identity.delegation import DELEGATION_METADATA, DelegationVerifier, link_audience
from sidecar.identity.factory import GRPC_SERVER_OPTIONS, IdentityRuntime, build_identity
from sidecar.identity.jwt_svid import JwtSvidValidator
from sidecar.identity.workload_api import WorkloadApiSource
from tests.doubles.identity_harness import fake_agent, remove_dir, short_dir
from tests.doubles.pki import TestJwtAuthority, tamper_payload

AUD = "spiffe://example.org/ns/agents/sa/sidecar"
DELEGATION = "spiffe://example.org/agent-sidecar/delegation"
POD = "spiffe://example.org/ns/agents/sa/sidecar"
ORCHESTRATOR = "spiffe://example.org/ns/agents/sa/orchestrator"
PLANNER = "spiffe://example.org/ns/agents/sa/planner"


@pytest.fixture(scope="module")
def agent():
    directory = short_dir()
    api = fake_agent(directory, path="/ns/agents/sa/sidecar")
    yield api
    api.stop()
    remove_dir(directory)


def identity_config(agent, **overrides):
    settings = {
        "listen.unix": "/tmp/unused.sock",
        "identity.sources": ["jwt_svid", "mtls", "workload_api"],
        "identity.workload_api_socket": agent.endpoint,
        "identity.jwt_audience": AUD,
        "identity.delegation_audience": DELEGATION,
        "escalation.approvers": ["email:*@example.org"],
    }
    settings.update({f"identity.{k}": v for k, v in overrides.items()})
    return load_config(None, settings).identity


@pytest.fixture
def runtime(agent):
    rt = build_identity(identity_config(agent))
    assert rt.source.wait_until_ready(30)
    yield rt
    rt.close()


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def test_precedence_explicit_credential_beats_the_transport(agent, runtime):
    resolver = runtime.resolver
    token = agent.jwt_authority.mint(PLANNER, AUD)
    on_unix = resolver.resolve(PeerInfo(transport="unix", metadata=bearer(token)))
    assert (on_unix.subject.spiffe_id, on_unix.subject.source) == (PLANNER, "jwt_svid")
    plain = resolver.resolve(PeerInfo(transport="unix"))
    assert (plain.subject.spiffe_id, plain.subject.source) == (POD, "workload_api")


def test_a_bad_credential_never_falls_back_to_the_transport(agent, runtime):
    expired = agent.jwt_authority.mint(PLANNER, AUD, ttl=-5)
    with pytest.raises(IdentityError, match="^jwt_svid: the token expired"):
        runtime.resolver.resolve(PeerInfo(transport="unix", metadata=bearer(expired)))


def test_configured_order_is_the_precedence(agent):
    rt = build_identity(identity_config(agent, sources=["workload_api", "jwt_svid"]))
    try:
        assert rt.source.wait_until_ready(30)
        token = agent.jwt_authority.mint(PLANNER, AUD)
        # workload_api listed first: on the unix socket the pod identity wins, the token is not read.
        got = rt.resolver.resolve(PeerInfo(transport="unix", metadata=bearer(token)))
        assert got.subject.source == "workload_api"
        assert rt.server_credentials is None  # no mtls: plaintext TCP listener
        # On TCP only the JWT applies.
        assert rt.resolver.resolve(PeerInfo(transport="tcp", metadata=bearer(token))).subject.source == "jwt_svid"
    finally:
        rt.close()


def test_nothing_applies(agent, runtime):
    with pytest.raises(IdentityError, match=r"no configured identity source applies .*transport tcp, no authorization"):
        runtime.resolver.resolve(PeerInfo(transport="tcp"))


def test_runtime_unpacks_for_server_py(runtime):
    resolver, credentials = runtime
    assert resolver is runtime.resolver and credentials is not None
    assert ("grpc.max_metadata_size", 64 * 1024) in GRPC_SERVER_OPTIONS
    serving, detail = resolver.health()
    assert serving and POD in detail


# ---------------------------------------------------------------- delegation


def chain_metadata(*tokens: str, token_for_caller: str | None = None) -> dict:
    md = {DELEGATION_METADATA: ",".join(tokens)}
    if token_for_caller:
        md.update(bearer(token_for_caller))
    return md


def links(agent, *hops: str, to: str = POD, base: str = DELEGATION, **kw) -> list[str]:
    """The chain hops[0] -> hops[1] -> ... -> `to`, each link minted for its place (delegation.py)."""
    tokens = []
    for i, hop in enumerate(hops):
        nxt = hops[i + 1] if i + 1 < len(hops) else to
        tokens.append(agent.jwt_authority.mint(hop, link_audience(base, to=nxt, from_=hops[i - 1] if i else None), **kw))
    return tokens


def test_delegation_chain_outermost_first(agent, runtime):
    upstream = links(agent, ORCHESTRATOR, PLANNER)
    identity = runtime.resolver.resolve(PeerInfo(transport="unix", metadata=chain_metadata(*upstream)))
    assert identity.subject.spiffe_id == POD
    assert [d.spiffe_id for d in identity.delegation] == [ORCHESTRATOR, PLANNER]
    assert all(d.source == "jwt_svid" and d.svid_expires_at for d in identity.delegation)
    assert [d.to_input()["path"] for d in identity.delegation] == ["/ns/agents/sa/orchestrator", "/ns/agents/sa/planner"]
    # spaces around commas are tolerated
    spaced = {DELEGATION_METADATA: " , ".join(upstream)}
    assert len(runtime.resolver.resolve(PeerInfo(transport="unix", metadata=spaced)).delegation) == 2


def test_link_audience_spelling():
    assert link_audience("d", to=PLANNER) == f"d?to={PLANNER}"
    assert link_audience("d", to=POD, from_=PLANNER) == f"d?from={PLANNER}&to={POD}"
    for bad in ("", "d?x", "a b", "d#", "d&", "d="):
        with pytest.raises(ValueError):
            link_audience(bad, to=POD)


@pytest.mark.parametrize(
    "make_links, reason",
    [
        (lambda a: [links(a, ORCHESTRATOR, PLANNER)[0],
                    TestJwtAuthority().mint(PLANNER, link_audience(DELEGATION, to=POD, from_=ORCHESTRATOR))],
         "delegation[1]: unknown kid"),
        (lambda a: [links(a, ORCHESTRATOR, PLANNER, ttl=-5)[0], links(a, ORCHESTRATOR, PLANNER)[1]],
         "delegation[0]: the token expired at"),
        (lambda a: [tamper_payload(links(a, ORCHESTRATOR)[0], exp=int(time.time()) + 9999)],
         "delegation[0]: the signature does not verify"),
        (lambda a: [a.jwt_authority.mint(ORCHESTRATOR, "someone-else")],
         "delegation[0]: the link is not bound to this place in the chain"),
        (lambda a: [a.jwt_authority.mint("spiffe://Example.org/x", link_audience(DELEGATION, to=POD))],
         "delegation[0]: sub 'spiffe://Example.org/x' is not a valid SPIFFE ID"),
        (lambda a: [links(a, ORCHESTRATOR)[0], ""], "none empty"),
        (lambda a: ["a.b.c"] * 9, "9 links, more than the 8 allowed"),
    ],
    ids=["forged", "expired", "tampered", "wrong-audience", "upper-case", "empty-link", "too-long"],
)
def test_bad_delegation_links_deny_naming_the_link(agent, runtime, make_links, reason):
    tokens = make_links(agent)
    with pytest.raises(IdentityError) as info:
        runtime.resolver.resolve(PeerInfo(transport="unix", metadata=chain_metadata(*tokens)))
    assert reason in info.value.reason


def test_delegation_has_its_own_audience_and_limit(agent):
    rt = build_identity(identity_config(agent, delegation_audience="agents-delegation", max_delegation_links=1))
    try:
        assert rt.source.wait_until_ready(30)
        (ok,) = links(agent, ORCHESTRATOR, base="agents-delegation")
        got = rt.resolver.resolve(PeerInfo(transport="unix", metadata=chain_metadata(ok)))
        assert [d.spiffe_id for d in got.delegation] == [ORCHESTRATOR]
        with pytest.raises(IdentityError, match=r"audience does not include 'agents-delegation\?to="):
            rt.resolver.resolve(PeerInfo(transport="unix", metadata=chain_metadata(*links(agent, ORCHESTRATOR))))
        with pytest.raises(IdentityError, match="2 links, more than the 1 allowed"):
            rt.resolver.resolve(PeerInfo(transport="unix", metadata=chain_metadata(ok, ok)))
    finally:
        rt.close()


def test_delegation_refused_without_an_audience_or_in_dev(agent):
    rt = build_identity(identity_config(agent, sources=["workload_api"], jwt_audience="", delegation_audience=""))
    try:
        assert rt.source.wait_until_ready(30)
        (token,) = links(agent, ORCHESTRATOR)
        with pytest.raises(IdentityError, match="no delegation audience is configured"):
            rt.resolver.resolve(PeerInfo(transport="unix", metadata=chain_metadata(token)))
    finally:
        rt.close()
    dev = build_identity(load_config(None, {"identity.sources": ["dev"]}).identity)  # dev mode, asked for
    assert dev.source is None and dev.server_credentials is None
    assert dev.resolver.resolve(PeerInfo(transport="tcp")).subject.source == "dev"
    assert dev.resolver.health() == (True, "DEV MODE: every caller is the dev identity spiffe://dev.local/agent "
                                           "(source: dev), and approvals are open (docs/configuration.md#outside-dev-mode)")
    with pytest.raises(IdentityError, match="cannot be verified here"):
        dev.resolver.resolve(PeerInfo(transport="tcp", metadata=chain_metadata("a.b.c")))
    with pytest.raises(IdentityError, match="0"):
        DelegationVerifier(None, max_links=0).verify({DELEGATION_METADATA: "a.b.c"}, POD)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"identity.sources": ["dev", "mtls"]}, "'dev' cannot be combined"),
        ({"identity.sources": ["jwt_svid"]}, "identity.jwt_audience: required"),
        ({"identity.sources": ["jwt_svid"], "identity.jwt_audience": AUD},
         "identity.delegation_audience: required with jwt_svid (it no longer falls back to identity.jwt_audience"),
        ({"identity.sources": ["jwt_svid"], "identity.jwt_audience": AUD, "identity.delegation_audience": AUD},
         "identity.delegation_audience and identity.jwt_audience: must differ"),
        ({"identity.sources": ["workload_api"], "listen.unix": "/tmp/x.sock", "identity.jwt_audience": "same",
          "identity.delegation_audience": "same", "escalation.approvers": ["email:a@example.org"]},
         "identity.delegation_audience and identity.jwt_audience: must differ"),
        ({"identity.delegation_audience": "agents?to=x"}, "identity.delegation_audience: 'agents?to=x' must not hold"),
        ({"identity.delegation_audience": "d", "identity.jwt_audience": "d?to=spiffe://example.org/a"},
         "identity.jwt_audience: must not start with identity.delegation_audience"),
        ({"identity.sources": ["jwt_svid"], "identity.jwt_audience": AUD, "identity.max_delegation_links": 0,
          "listen.tcp": "0.0.0.0:50051", "escalation.approvers": ["email:a@example.org"]},
         "listen.tcp: 0.0.0.0:50051 is plaintext"),
        ({"identity.sources": ["mtls", "mtls"]}, "mtls listed more than once"),
        ({"identity.sources": ["kerberos"]}, "unknown source 'kerberos'"),
        ({"identity.sources": ["workload_api"], "listen.unix": ""}, "listen.unix, which is empty"),
        ({"identity.sources": ["mtls"], "listen.tcp": "", "listen.unix": "/tmp/x.sock"}, "listen.tcp, which is empty"),
        ({"identity.workload_api_socket": "/run/spire/agent.sock"}, "unix:///absolute/path"),
        ({"identity.trust_domains": ["Example.org"]}, "identity.trust_domains[0]"),
        ({"identity.workload_api_timeout_ms": 0}, "identity.workload_api_timeout_ms: must be positive"),
        ({"identity.max_delegation_links": -1}, "identity.max_delegation_links"),
        ({"identity.jwt_audience": " aud"}, "identity.jwt_audience"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_missing_workload_api_socket_is_a_startup_error(monkeypatch):
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    config = load_config(None, {"identity.sources": ["workload_api"], "listen.unix": "/tmp/x.sock",
                                "escalation.approvers": ["email:*@example.org"]})
    with pytest.raises(ValueError, match="SPIFFE_ENDPOINT_SOCKET"):
        build_identity(config.identity)


def test_build_identity_does_not_block_on_a_missing_agent():
    directory = short_dir()
    try:
        config = load_config(None, {
            "identity.sources": ["mtls", "workload_api"], "listen.unix": "/tmp/x.sock",
            "escalation.approvers": ["email:*@example.org"],
            "identity.workload_api_socket": f"unix://{directory}/missing.sock",
        }).identity
        started = time.monotonic()
        rt = build_identity(config)
        assert time.monotonic() - started < 5  # not waiting for the missing agent (5: a loaded machine, was 1)
        assert isinstance(rt, IdentityRuntime) and rt.server_credentials is not None
        serving, detail = rt.resolver.health()
        assert not serving
        rt.close()
    finally:
        remove_dir(directory)


def test_composite_needs_a_source():
    with pytest.raises(ValueError):
        CompositeResolver([])


def test_validator_needs_an_audience(agent):
    with pytest.raises(ValueError):
        JwtSvidValidator(WorkloadApiSource(agent.endpoint), "")


def test_resolve_caller_never_raises_a_resolver_bug_denies():
    """Every front door resolves through resolve_caller: a refusal passes through, a crash is a refusal."""
    from sidecar.identity import IdentityError, PeerInfo, resolve_caller

    class Refusing:
        def resolve(self, peer):
            raise IdentityError("no SVID on this connection")

    class Broken:
        def resolve(self, peer):
            raise KeyError("x-spiffe")

    peer = PeerInfo(transport="unix")
    refused = resolve_caller(Refusing(), peer)
    assert isinstance(refused, IdentityError) and refused.reason == "no SVID on this connection"
    crashed = resolve_caller(Broken(), peer)
    assert isinstance(crashed, IdentityError) and crashed.reason == "identity could not be verified (KeyError)"
