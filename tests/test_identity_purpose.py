"""A credential issued for one purpose is never accepted for another (issue 11, section 4).

Caller tokens and delegation links are told apart by their audiences; a
delegation link is accepted only in the place of the chain it was minted
for; two credentials on one call must name the same caller; X.509-SVIDs and
other trust domains' tokens are not JWT-SVIDs of ours. Every token is a real
ES256 JWT-SVID from the fake Workload API's authority (tests/doubles), or
built from real keys where SPIRE would never issue it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import jwt
import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient

from sidecar.client import AsyncClient, delegated_by
from sidecar.config import load_config
from sidecar.identity import IdentityError, PeerInfo
from sidecar.identity.delegation import DELEGATION_METADATA, link_audience
from sidecar.identity.factory import build_identity
from tests.conftest import LOADED_MACHINE, write_policy
from tests.doubles.identity_harness import ProbeServer, ask, client_credentials, fake_agent, remove_dir, short_dir
from tests.doubles.pki import TestJwtAuthority

SIDECAR = "spiffe://example.org/ns/agents/sa/sidecar"
AUD = SIDECAR  # the documented choice: the sidecar's own SPIFFE ID
DELEGATION = "spiffe://example.org/agent-sidecar/delegation"
ORCHESTRATOR = "spiffe://example.org/ns/agents/sa/orchestrator"
PLANNER = "spiffe://example.org/ns/agents/sa/planner"
SCOUT = "spiffe://example.org/ns/agents/sa/scout"
RESEARCH = "spiffe://example.org/ns/agents/sa/research"
MALLORY = "spiffe://example.org/ns/agents/sa/mallory"
PARTNER_AGENT = "spiffe://partner.example/ns/agents/sa/helper"


@pytest.fixture(scope="module")
def agent():
    directory = short_dir()
    api = fake_agent(directory, path="/ns/agents/sa/sidecar")
    api.partner = TestJwtAuthority("partner.example")
    api.federate_with("partner.example", jwt_authority=api.partner)
    yield api
    api.stop()
    remove_dir(directory)


def settings(agent, **identity) -> dict:
    values = {
        "listen.unix": "/tmp/unused.sock",
        "identity.sources": ["jwt_svid", "mtls", "workload_api"],
        "identity.workload_api_socket": agent.endpoint,
        "identity.jwt_audience": AUD,
        "identity.delegation_audience": DELEGATION,
        "escalation.approvers": ["email:*@example.org"],
    }
    values.update({f"identity.{k}": v for k, v in identity.items()})
    return values


@pytest.fixture
def make_runtime(agent):
    runtimes = []

    def make(**identity):
        rt = build_identity(load_config(None, settings(agent, **identity)).identity)
        assert rt.source.wait_until_ready(30)
        deadline = time.monotonic() + 30  # the federated bundle arrives on the stream in the background
        while rt.source.jwt_keys("partner.example") is None:
            assert time.monotonic() < deadline, "the partner's JWT keys never arrived"
            time.sleep(0.02)
        runtimes.append(rt)
        return rt

    yield make
    for rt in runtimes:
        rt.close()


@pytest.fixture
def resolver(make_runtime):
    return make_runtime().resolver


def caller_token(agent, who: str, aud=AUD, **kw) -> str:
    return agent.jwt_authority.mint(who, aud, **kw)


def link(agent, who: str, to: str, from_: str | None = None, **kw) -> str:
    return agent.jwt_authority.mint(who, link_audience(DELEGATION, to=to, from_=from_), **kw)


def chain(agent, *hops: str, caller: str) -> list[str]:
    """hops[0] -> hops[1] -> ... -> caller, every link minted for its place."""
    return [
        link(agent, hop, hops[i + 1] if i + 1 < len(hops) else caller, hops[i - 1] if i else None)
        for i, hop in enumerate(hops)
    ]


def call(token: str | None = None, links: list[str] | None = None, transport: str = "unix") -> PeerInfo:
    metadata = {}
    if token is not None:
        metadata["authorization"] = f"Bearer {token}"
    if links is not None:
        metadata[DELEGATION_METADATA] = ",".join(links)
    return PeerInfo(transport=transport, metadata=metadata)


def denied(resolver, peer: PeerInfo) -> str:
    with pytest.raises(IdentityError) as info:
        resolver.resolve(peer)
    return info.value.reason


# ------------------------------------------------------- caller token vs link


def test_the_issue_example_a_delegation_link_is_not_a_caller_token(agent, resolver):
    # The orchestrator hands the research agent a link; the research agent sends it as its own token.
    (orchestrator_link,) = chain(agent, ORCHESTRATOR, caller=RESEARCH)
    reason = denied(resolver, call(orchestrator_link, transport="tcp"))
    assert reason.startswith("jwt_svid: the token's audience does not include"), reason
    # Used as meant, the same link makes the research agent the subject, the orchestrator upstream.
    got = resolver.resolve(call(caller_token(agent, RESEARCH), [orchestrator_link], transport="tcp"))
    assert got.subject.spiffe_id == RESEARCH and [d.spiffe_id for d in got.delegation] == [ORCHESTRATOR]


def test_a_caller_token_is_not_a_delegation_link(agent, resolver):
    reason = denied(resolver, call(caller_token(agent, RESEARCH), [caller_token(agent, ORCHESTRATOR)]))
    assert reason.startswith("delegation[0]: the link is not bound to this place in the chain"), reason
    assert f"{DELEGATION}?to={RESEARCH}" in reason


def test_a_token_minted_for_both_purposes_is_neither(agent, resolver):
    both = caller_token(agent, ORCHESTRATOR, aud=[AUD, link_audience(DELEGATION, to=RESEARCH)])
    assert "carries 2 audiences" in denied(resolver, call(both, transport="tcp"))
    assert "carries 2 audiences" in denied(resolver, call(caller_token(agent, RESEARCH), [both]))


@pytest.mark.parametrize(
    "aud",
    [
        [AUD, "spiffe://example.org/ns/tools/sa/search"],  # another service could replay it here
        ["spiffe://example.org/ns/tools/sa/search", AUD],
        [AUD, AUD],
        "spiffe://example.org/",  # a whole trust domain, not this sidecar
        AUD + "/",
        AUD.upper(),
        "",
    ],
)
def test_caller_tokens_carry_exactly_our_one_audience(agent, resolver, aud):
    reason = denied(resolver, call(caller_token(agent, RESEARCH, aud=aud), transport="tcp"))
    assert reason.startswith("jwt_svid: ") and ("audience" in reason or "no aud claim" in reason), reason


def test_config_refuses_one_audience_for_both_purposes(agent):
    from sidecar.config import ConfigError

    for identity, message in (
        ({"delegation_audience": AUD}, "identity.delegation_audience and identity.jwt_audience: must differ"),
        ({"delegation_audience": ""}, "identity.delegation_audience: required with jwt_svid"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(None, settings(agent, **identity))
        assert message in str(info.value)
    # Refusing chains outright needs no delegation audience.
    load_config(None, settings(agent, delegation_audience="", max_delegation_links=0))


# -------------------------------------------------------- chain binding


def test_a_bound_chain_is_accepted(agent, resolver):
    links = chain(agent, ORCHESTRATOR, PLANNER, SCOUT, caller=RESEARCH)
    got = resolver.resolve(call(caller_token(agent, RESEARCH), links))
    assert [d.spiffe_id for d in got.delegation] == [ORCHESTRATOR, PLANNER, SCOUT]


def test_a_link_fetched_from_the_workload_api_with_py_spiffe(agent, resolver):
    # What an agent does (docs/identity.md): mint its link for the next hop with fetch_jwt_svid.
    with WorkloadApiClient(agent.endpoint, default_timeout=5) as client:
        minted = client.fetch_jwt_svid(audience={link_audience(DELEGATION, to=RESEARCH)}).token
    got = resolver.resolve(call(caller_token(agent, RESEARCH), [minted]))
    assert [d.spiffe_id for d in got.delegation] == [SIDECAR]


@pytest.mark.parametrize(
    "tamper, reason",
    [
        # replayed under another caller: the last link names RESEARCH, MALLORY presents it
        (lambda links: ("mallory", links), "delegation[2]: the link is not bound"),
        (lambda links: ("research", [links[1], links[0], links[2]]), "delegation[0]: the link is not bound"),
        (lambda links: ("research", [links[0], links[2]]), "delegation[0]: the link is not bound"),  # middle gone
        (lambda links: ("research", links[1:]), "delegation[0]: the link is not bound"),  # outermost gone
        (lambda links: ("research", links[:2]), "delegation[1]: the link is not bound"),  # last gone
        (lambda links: ("research", [links[0], links[0], links[1], links[2]]), "delegation[1]: "),
        (lambda links: ("research", links + [links[2]]), "delegation[3]: "),
        (lambda links: ("research", [links[2]]), "delegation[0]: the link is not bound"),
    ],
    ids=["another-caller", "reordered", "middle-dropped", "outermost-dropped", "last-dropped", "repeated",
         "repeated-last", "only-the-last"],
)
def test_links_cannot_be_replayed_reordered_repeated_or_dropped(agent, resolver, tamper, reason):
    links = chain(agent, ORCHESTRATOR, PLANNER, SCOUT, caller=RESEARCH)
    who, tampered = tamper(links)
    caller = {"mallory": MALLORY, "research": RESEARCH}[who]
    got = denied(resolver, call(caller_token(agent, caller), tampered))
    assert got.startswith(reason), got


def test_a_caller_never_appears_in_its_own_chain(agent, resolver):
    # RESEARCH -> PLANNER -> RESEARCH: a loop back to the caller
    links = [link(agent, RESEARCH, PLANNER), link(agent, PLANNER, RESEARCH, RESEARCH)]
    assert "is the caller itself" in denied(resolver, call(caller_token(agent, RESEARCH), links))
    loop = [link(agent, ORCHESTRATOR, PLANNER), link(agent, PLANNER, ORCHESTRATOR, ORCHESTRATOR),
            link(agent, ORCHESTRATOR, RESEARCH, PLANNER)]
    assert "already appears as delegation[0]" in denied(resolver, call(caller_token(agent, RESEARCH), loop))


def test_a_link_for_another_sidecar_deployment_is_refused(agent, resolver):
    foreign = agent.jwt_authority.mint(ORCHESTRATOR, link_audience("spiffe://example.org/other/delegation", to=RESEARCH))
    assert "not bound" in denied(resolver, call(caller_token(agent, RESEARCH), [foreign]))


AGENTS = [f"spiffe://example.org/ns/agents/sa/a{i}" for i in range(6)]


@st.composite
def chains_and_tampering(draw):
    """A bound chain (distinct agents, then the caller) and what an attacker makes of it."""
    people = draw(st.permutations(AGENTS))
    n = draw(st.integers(1, 4))
    hops, caller = list(people[:n]), people[n]
    indices = list(range(n))
    op = draw(st.sampled_from(["none", "permute", "drop", "repeat", "caller", "splice"]))
    presented, presenter = indices, caller
    if op == "permute":
        presented = draw(st.permutations(indices))
    elif op == "drop":
        presented = sorted(draw(st.sets(st.sampled_from(indices), max_size=n - 1))) if n > 1 else []
    elif op == "repeat":
        presented = list(indices)
        presented.insert(draw(st.integers(0, n)), draw(st.sampled_from(indices)))
    elif op == "caller":
        presenter = draw(st.sampled_from([p for p in people if p != caller]))
    elif op == "splice":  # a link minted for another place by the same agent
        presented = list(indices)
    return hops, caller, op, presented, presenter, draw(st.integers(0, n - 1))


@pytest.fixture(scope="module")
def module_resolver(agent):
    rt = build_identity(load_config(None, settings(agent)).identity)
    assert rt.source.wait_until_ready(30)
    yield rt.resolver
    rt.close()


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=chains_and_tampering())
def test_property_a_chain_is_accepted_exactly_as_minted(agent, module_resolver, case):
    hops, caller, op, presented, presenter, spliced = case
    links = chain(agent, *hops, caller=caller)
    tokens = [links[i] for i in presented]
    if op == "splice":  # the same agent's link, minted for a different next hop
        tokens[spliced] = link(agent, hops[spliced], "spiffe://example.org/ns/agents/sa/elsewhere",
                               hops[spliced - 1] if spliced else None)
    peer = call(caller_token(agent, presenter), tokens) if tokens else call(caller_token(agent, presenter))
    untouched = tokens == links and presenter == caller
    if untouched:
        got = module_resolver.resolve(peer)
        assert [d.spiffe_id for d in got.delegation] == hops and got.subject.spiffe_id == caller
    elif not tokens:
        assert module_resolver.resolve(peer).delegation == ()  # no chain at all: the caller on its own
    else:
        with pytest.raises(IdentityError, match=r"^delegation\[\d+\]: "):
            module_resolver.resolve(peer)


# ------------------------------------------------------------ trust domains


def test_tokens_and_links_from_a_trust_domain_not_configured(agent, resolver, make_runtime):
    partner_token = agent.partner.mint(PARTNER_AGENT, AUD)
    partner_link = agent.partner.mint(PARTNER_AGENT, link_audience(DELEGATION, to=RESEARCH))
    assert "trust domain partner.example is not accepted" in denied(resolver, call(partner_token, transport="tcp"))
    reason = denied(resolver, call(caller_token(agent, RESEARCH), [partner_link]))
    assert reason.startswith("delegation[0]: trust domain partner.example is not accepted"), reason
    # A partner key signing for our trust domain: the kid is not in example.org's bundle.
    impostor = agent.partner.mint(ORCHESTRATOR, AUD)
    assert "unknown kid" in denied(resolver, call(impostor, transport="tcp"))
    # Accepted once configured, still bound to the chain.
    federated = make_runtime(trust_domains=["example.org", "partner.example"]).resolver
    assert federated.resolve(call(partner_token, transport="tcp")).subject.spiffe_id == PARTNER_AGENT
    got = federated.resolve(call(caller_token(agent, RESEARCH), [partner_link]))
    assert [d.spiffe_id for d in got.delegation] == [PARTNER_AGENT]
    assert "unknown kid" in denied(federated, call(impostor, transport="tcp"))


# --------------------------------------------------- X.509-SVIDs are not JWTs


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def x509_as_jwt_variants(agent) -> dict[str, str]:
    """An agent's own X.509-SVID (which it holds, key and all) pressed into JWT-shaped credentials."""
    svid = agent.ca.issue("/ns/agents/sa/research")
    der = svid.chain_der()
    x5c = [base64.b64encode(svid.cert.public_bytes(Encoding.DER)).decode()]
    claims = {"sub": ORCHESTRATOR, "aud": AUD, "exp": int(time.time()) + 300}
    return {
        "DER chain": _b64(der),
        "PEM in one line": svid.chain_pem().decode().replace("\n", ""),
        # signed with the X.509-SVID key, the certificate in x5c, no kid our bundle knows
        "x5c, own key": jwt.encode(claims, svid.key, algorithm="ES256", headers={"x5c": x5c, "kid": "x509"}),
        # the JWT authority's kid, but the X.509-SVID's key signed it
        "borrowed kid": jwt.encode(claims, svid.key, algorithm="ES256", headers={"kid": agent.jwt_authority.kid}),
        # the key embedded in the header (jwk), as some libraries would trust
        "jwk header": jwt.encode(claims, svid.key, algorithm="ES256", headers={
            "kid": "embedded", "jwk": json.loads(jwt.algorithms.ECAlgorithm.to_jwk(svid.key.public_key()))}),
    }


def test_an_x509_svid_is_not_accepted_where_a_jwt_svid_is_expected(agent, resolver):
    for name, credential in x509_as_jwt_variants(agent).items():
        as_token = denied(resolver, call(credential, transport="tcp"))
        assert as_token.startswith("jwt_svid: "), (name, as_token)
        as_link = denied(resolver, call(caller_token(agent, RESEARCH), [credential]))
        assert as_link.startswith(("delegation[0]: ", "delegation: ")), (name, as_link)


# -------------------------------------------- two credentials, one caller


async def test_a_token_must_name_the_mtls_peer(agent, make_runtime):
    runtime = make_runtime()
    directory = short_dir()
    probe = await ProbeServer(runtime.resolver, directory).start(runtime.server_credentials)
    try:
        target = f"127.0.0.1:{probe.tls_port}"
        research_cert = client_credentials(agent.ca.issue("/ns/agents/sa/research"), agent.ca.bundle_pem())

        def bearer(token: str) -> list[tuple[str, str]]:
            return [("authorization", f"Bearer {token}")]

        # the certificate alone, and certificate plus its own token: the research agent
        assert (await ask(target, credentials=research_cert))["subject"]["spiffe_id"] == RESEARCH
        both = await ask(target, credentials=research_cert, metadata=bearer(caller_token(agent, RESEARCH)))
        assert both["subject"] == {**both["subject"], "spiffe_id": RESEARCH, "source": "jwt_svid"}
        # the research agent's certificate with the orchestrator's (leaked) token
        mixed = await ask(target, credentials=research_cert, metadata=bearer(caller_token(agent, ORCHESTRATOR)))
        assert mixed["denied"] == (
            f"jwt_svid and mtls name different callers ({ORCHESTRATOR} and {RESEARCH}); "
            "a call's credentials must all name its caller"
        )
        # a bad token next to a good certificate is still a bad token
        expired = await ask(target, credentials=research_cert,
                            metadata=bearer(caller_token(agent, RESEARCH, ttl=-5)))
        assert expired["denied"].startswith("jwt_svid: the token expired")
    finally:
        await probe.stop()
        remove_dir(directory)

    # mtls listed first: the certificate decides, and the token must still agree
    mtls_first = make_runtime(sources=["mtls", "jwt_svid", "workload_api"])
    directory = short_dir()
    probe = await ProbeServer(mtls_first.resolver, directory).start(mtls_first.server_credentials)
    try:
        target = f"127.0.0.1:{probe.tls_port}"
        research_cert = client_credentials(agent.ca.issue("/ns/agents/sa/research"), agent.ca.bundle_pem())
        mixed = await ask(target, credentials=research_cert,
                          metadata=[("authorization", f"Bearer {caller_token(agent, ORCHESTRATOR)}")])
        assert mixed["denied"].startswith("mtls and jwt_svid name different callers")
    finally:
        await probe.stop()
        remove_dir(directory)


# ------------------------------------------------ the issue's example, end to end

RUN_SQL_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": [sprintf("granted: %v", [input.subject.spiffe_id])],
                 "obligations": {}} if {
        input.subject.spiffe_id == "spiffe://example.org/ns/agents/sa/orchestrator"
        input.subject.source == "jwt_svid"
        input.tool.name == "run_sql"
    }
"""


async def test_the_research_agent_cannot_run_sql_as_the_orchestrator(agent, tmp_path: Path, running_sidecar):
    config = load_config(None, {
        **LOADED_MACHINE,  # room for a loaded machine: identity is under test, not policy speed
        "listen.tcp": "127.0.0.1:0",
        "listen.unix": "",
        "policy.dir": str(write_policy(tmp_path / "rego", RUN_SQL_POLICY)),
        "policy.reload": False,
        "evidence.dir": str(tmp_path / "evidence"),
        "escalation.path": str(tmp_path / "escalations.db"),
        "telemetry.exporter": "none",
        "identity.sources": ["jwt_svid"],
        "identity.workload_api_socket": agent.endpoint,
        "identity.jwt_audience": AUD,
        "identity.delegation_audience": DELEGATION,
        "escalation.approvers": ["email:*@example.org"],
    })
    sidecar = await running_sidecar(config)
    target = sidecar.addresses[0]
    (orchestrator_link,) = chain(agent, ORCHESTRATOR, caller=RESEARCH)

    def bearer(token: str):
        return lambda: (("authorization", f"Bearer {token}"),)

    deadline = time.monotonic() + 60  # as soon as it is allowed; room for a loaded machine
    async with AsyncClient(target, metadata=bearer(caller_token(agent, ORCHESTRATOR))) as orchestrator:
        while True:  # until the sidecar holds its SVID and the JWT bundles
            allowed = await orchestrator.authorize("run_sql", {"query": "select 1"})
            if allowed.outcome == "allow" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert allowed.outcome == "allow", allowed.reasons
    async with AsyncClient(target, metadata=bearer(orchestrator_link)) as research:
        stolen = await research.authorize("run_sql", {"query": "select 1"})
    assert stolen.outcome == "deny"
    assert stolen.reasons[0].startswith("unverified_caller: jwt_svid: the token's audience does not include")
    async with AsyncClient(target, metadata=bearer(caller_token(agent, RESEARCH))) as research:
        with delegated_by(orchestrator_link):
            delegated = await research.authorize("run_sql", {"query": "select 1"})
    assert delegated.outcome == "deny" and list(delegated.reasons) == ["no rule allows this call"]


async def test_over_grpc_links_in_repeated_metadata_keep_their_order(agent, make_runtime):
    """gRPC joins a repeated key in order (servicer.peer_info): the binding still decides."""
    runtime = make_runtime()
    directory = short_dir()
    probe = await ProbeServer(runtime.resolver, directory).start()
    try:
        target = f"unix:{probe.unix_path}"
        links = chain(agent, ORCHESTRATOR, PLANNER, caller=RESEARCH)
        me = ("authorization", f"Bearer {caller_token(agent, RESEARCH)}")
        in_order = await ask(target, metadata=[me, (DELEGATION_METADATA, links[0]), (DELEGATION_METADATA, links[1])])
        assert [d["spiffe_id"] for d in in_order["delegation"]] == [ORCHESTRATOR, PLANNER]
        swapped = await ask(target, metadata=[me, (DELEGATION_METADATA, links[1]), (DELEGATION_METADATA, links[0])])
        assert swapped["denied"].startswith("delegation[0]: the link is not bound")
        # a link as the caller's token, over the wire
        stolen = await ask(target, metadata=[("authorization", f"Bearer {links[1]}")])
        assert stolen["denied"].startswith("jwt_svid: the token's audience does not include")
    finally:
        await probe.stop()
        remove_dir(directory)
