"""The sidecar against a real SPIRE server and agent (tests/infra/spire.py), end to end.

One SPIRE server (trust domain `sidecar.test`) and one agent for the module.
Registrations on that agent (parent: its node alias):

- the sidecar, i.e. this Python process: `unix:uid:<ours>` + `unix:path:<python>`,
  DNS SAN `sidecar.local` (python grpc clients check the server's hostname);
- the callers `orchestrator`, `planner` and `research`: `unix:uid:<ours>` +
  `unix:path:` of their own hard link of spire-agent, whose `api fetch` gets
  their SVIDs.

Everything the sidecar verifies here was issued by SPIRE: its own SVID and
bundles (Workload API), the planner's X.509-SVID (mTLS), JWT-SVIDs (bearer and
delegation). The only hand-made credential is a SPIRE token with its payload
swapped, which SPIRE cannot produce.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
from pathlib import Path
from typing import Callable

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from spiffe import JwtSource, WorkloadApiClient, X509Source

from sidecar.client import AsyncClient, JwtSvidAuth, SpiffeMtls, delegated_by
from sidecar.escalation.client import ApprovalsClient, ApprovalsError
from sidecar.config import Config, load_config
from sidecar.identity.delegation import link_audience
from tests.conftest import write_policy
from tests.infra.spire import SpireAgent, SpireServer, SpireUnavailable, X509Svid, own_process_selectors

TD = "sidecar.test"
SIDECAR_PATH = "/ns/agents/sa/sidecar"
SIDECAR_ID = f"spiffe://{TD}{SIDECAR_PATH}"
PLANNER_ID = f"spiffe://{TD}/ns/agents/sa/planner"
ORCHESTRATOR_ID = f"spiffe://{TD}/ns/agents/sa/orchestrator"
RESEARCH_ID = f"spiffe://{TD}/ns/agents/sa/research"
AUD = SIDECAR_ID  # identity.jwt_audience
DELEGATION = f"spiffe://{TD}/agent-sidecar/delegation"  # identity.delegation_audience
SIDECAR_DNS = "sidecar.local"

# Allows `echo` and echoes what policy saw of the caller into the reason.
IDENTITY_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "obligations": {}, "reasons": [concat("|", [
        input.subject.spiffe_id, input.subject.source, input.subject.trust_domain,
        input.subject.path, input.subject.svid_expires_at,
        concat(">", [d.spiffe_id | some d in input.delegation])])]} if {
        input.tool.name == "echo"
    }
"""


# ---------------------------------------------------------------- helpers shared by the test_spire_* modules
def start_spire(trust_domain: str = TD) -> SpireServer:
    """A started SPIRE server; a missing build fails the test (never a skip).

    The module-scoped `spire` fixture (tests/conftest.py) starts one in TD for each test module."""
    try:
        return SpireServer(trust_domain).start()
    except SpireUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


def seen(result) -> dict:
    """What policy saw of the caller, from IDENTITY_POLICY's reason (the call must have been allowed)."""
    assert result.outcome == "allow", result.reasons
    spiffe_id, source, td, path, expires, chain = result.reasons[0].split("|")
    return {"spiffe_id": spiffe_id, "source": source, "trust_domain": td, "path": path,
            "svid_expires_at": expires, "delegation": chain.split(">") if chain else []}


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def not_after(pem: bytes) -> str:
    return rfc3339(x509.load_pem_x509_certificate(pem).not_valid_after_utc)


def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def records(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("evidence-*.jsonl")):
        out.extend(json.loads(line) for line in path.read_bytes().splitlines())
    return [r for r in out if r.get("kind") == "decision"]


def record_of(directory: Path, result) -> dict:
    return next(r for r in records(directory) if r["decision_id"] == result.decision_id)


async def health(sidecar) -> tuple[int, str]:
    async with grpc.aio.insecure_channel(unix_target(sidecar)) as channel:
        call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        reply = await call
        detail = dict(await call.trailing_metadata()).get("sidecar-health-detail", "")
        return reply.status, detail


async def wait_health(sidecar, status, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got, detail = await health(sidecar)
        if got == status:
            return detail
        assert time.monotonic() < deadline, f"health stayed {got}: {detail}"
        await asyncio.sleep(0.1)


async def wait_for(probe: Callable, what: str, timeout: float = 60.0):
    """Call the async `probe` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.2)


def unix_target(sidecar) -> str:
    return next(a for a in sidecar.addresses if a.startswith("unix:"))


def tls_target(sidecar) -> str:
    return next(a for a in sidecar.addresses if not a.startswith("unix:"))


def mtls_client(sidecar, svid: X509Svid) -> AsyncClient:
    """A client presenting a SPIRE-issued X.509-SVID and trusting SPIRE's bundle for the server."""
    credentials = grpc.ssl_channel_credentials(svid.bundle_pem, svid.key_pem, svid.chain_pem)
    return AsyncClient(tls_target(sidecar), credentials=credentials,
                       options=[("grpc.ssl_target_name_override", SIDECAR_DNS)])


def bearer(token: str) -> Callable:
    return lambda: [("authorization", f"Bearer {token}")]


def register_sidecar(agent: SpireAgent, **options) -> None:
    """The registration a pod-level sidecar needs, with this process's unix selectors."""
    agent.register(SIDECAR_PATH, *own_process_selectors(), dns=(SIDECAR_DNS,), **options)


def sidecar_settings(tmp_path: Path, agent: SpireAgent, overrides: dict | None = None, **identity) -> Config:
    sock = Path(agent.server.directory) / f"sc-{tmp_path.name[-12:]}"
    sock.mkdir(exist_ok=True)
    settings = {
        "listen.tcp": "127.0.0.1:0",
        "listen.unix": str(sock / "sidecar.sock"),
        "policy.dir": str(write_policy(tmp_path / "rego", IDENTITY_POLICY)),
        "policy.reload": False,
        "policy.timeout_ms": 5000,  # identity is under test, not policy speed on a loaded machine
        "sidecar.instance_id": "spire-test",
        "evidence.dir": str(tmp_path / "evidence"),
        "escalation.path": str(tmp_path / "escalations.db"),
        "telemetry.exporter": "none",
        "identity.sources": ["jwt_svid", "mtls", "workload_api"],
        "identity.workload_api_socket": agent.endpoint,
        "identity.jwt_audience": AUD,
        "identity.delegation_audience": DELEGATION,
        "identity.workload_api_max_backoff_ms": 200,
        "escalation.approvers": ["email:*@example.org"],
    }
    settings.update({f"identity.{k}": v for k, v in identity.items()})
    settings.update(overrides or {})
    return load_config(None, settings)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def node(spire):
    agent = spire.agent("node1")
    register_sidecar(agent)
    callers = {}
    for name, spiffe_id in (("planner", PLANNER_ID), ("orchestrator", ORCHESTRATOR_ID), ("research", RESEARCH_ID)):
        callers[name] = agent.workload(name)
        agent.register(spiffe_id.removeprefix(f"spiffe://{TD}"), *callers[name].selectors)
    for workload in callers.values():
        workload.wait_for_identity()
    return agent, callers


@pytest.fixture
async def sidecar(node, tmp_path, running_sidecar):
    agent, _ = node
    started = await running_sidecar(sidecar_settings(tmp_path, agent))
    await wait_health(started, health_pb2.HealthCheckResponse.SERVING)
    return started


# ---------------------------------------------------------------- tests
async def test_the_sidecar_serves_with_the_svid_and_bundles_spire_issued_it(node, sidecar, tmp_path):
    agent, callers = node
    detail = await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
    assert SIDECAR_ID in detail
    # What SPIRE hands this process (the sidecar's process) right now.
    with WorkloadApiClient(agent.endpoint) as workload_api:
        own = workload_api.fetch_x509_svid()
    assert str(own.spiffe_id) == SIDECAR_ID

    async with AsyncClient(unix_target(sidecar)) as client:
        allowed = await client.authorize("echo", {})
    assert allowed.outcome == "allow"
    assert seen(allowed) == {
        "spiffe_id": SIDECAR_ID, "source": "workload_api", "trust_domain": TD, "path": SIDECAR_PATH,
        "svid_expires_at": rfc3339(own.leaf.not_valid_after_utc), "delegation": [],
    }
    assert record_of(tmp_path / "evidence", allowed)["subject"]["spiffe_id"] == SIDECAR_ID

    # The sidecar's bundle is SPIRE's: a client whose SVID chains only to SPIRE's CA gets in.
    async with mtls_client(sidecar, callers["planner"].fetch_x509()) as client:
        assert (await client.authorize("echo", {})).outcome == "allow"


async def test_mtls_between_a_client_and_the_sidecar_with_spire_issued_svids(node, sidecar, tmp_path):
    _, callers = node
    svid = callers["planner"].fetch_x509()
    # The client checks the sidecar's certificate against SPIRE's bundle and the
    # DNS SAN of the sidecar's registration; the sidecar checks the client's.
    async with mtls_client(sidecar, svid) as client:
        allowed = await client.authorize("echo", {})
    got = seen(allowed)
    assert (got["spiffe_id"], got["source"], got["trust_domain"]) == (PLANNER_ID, "mtls", TD)
    assert got["svid_expires_at"] == not_after(svid.chain_pem)
    assert record_of(tmp_path / "evidence", allowed)["subject"]["source"] == "mtls"

    # No client certificate: the handshake is refused, nothing reaches policy.
    plain = grpc.ssl_channel_credentials(svid.bundle_pem)
    async with AsyncClient(tls_target(sidecar), credentials=plain,
                           options=[("grpc.ssl_target_name_override", SIDECAR_DNS)]) as client:
        with pytest.raises(grpc.RpcError) as info:
            await client.authorize("echo", {})
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_jwt_svid_minted_by_spire_is_verified_and_another_audience_refused(node, sidecar, tmp_path):
    _, callers = node
    token = callers["planner"].fetch_jwt(AUD)
    async with AsyncClient(unix_target(sidecar), metadata=bearer(token)) as client:
        allowed = await client.authorize("echo", {})
    got = seen(allowed)
    assert (got["spiffe_id"], got["source"]) == (PLANNER_ID, "jwt_svid")
    assert got["svid_expires_at"] == rfc3339(dt.datetime.fromtimestamp(claims(token)["exp"], dt.timezone.utc))

    elsewhere = callers["planner"].fetch_jwt(f"spiffe://{TD}/ns/tools/sa/elsewhere")
    async with AsyncClient(unix_target(sidecar), metadata=bearer(elsewhere)) as client:
        refused = await client.authorize("echo", {})
    assert refused.outcome == "deny"
    assert refused.reasons[0].startswith("unverified_caller: jwt_svid: ")
    assert f"audience does not include {AUD!r}" in refused.reasons[0]
    record = record_of(tmp_path / "evidence", refused)
    assert record["subject"] is None and record["outcome"] == "deny"

    # SPIRE's signature is what is checked: the planner's token made to say "orchestrator".
    header, payload, signature = token.split(".")
    swapped = dict(claims(token), sub=ORCHESTRATOR_ID)
    forged = ".".join([header, base64.urlsafe_b64encode(json.dumps(swapped).encode()).rstrip(b"=").decode(), signature])
    async with AsyncClient(unix_target(sidecar), metadata=bearer(forged)) as client:
        refused = await client.authorize("echo", {})
    assert refused.outcome == "deny" and "signature does not verify" in refused.reasons[0]


async def test_a_delegation_chain_of_spire_jwt_svids(node, sidecar, tmp_path):
    """orchestrator -> planner -> research (the caller); each link minted by SPIRE for its place."""
    _, callers = node
    caller = callers["research"].fetch_jwt(AUD)
    orchestrator_link = callers["orchestrator"].fetch_jwt(link_audience(DELEGATION, to=PLANNER_ID))
    planner_link = callers["planner"].fetch_jwt(link_audience(DELEGATION, to=RESEARCH_ID, from_=ORCHESTRATOR_ID))
    async with AsyncClient(unix_target(sidecar), metadata=bearer(caller)) as client:
        with delegated_by(orchestrator_link, planner_link):
            chained = await client.authorize("echo", {})
        with delegated_by(orchestrator_link):  # the planner's link dropped: the chain no longer reaches the caller
            dropped = await client.authorize("echo", {})
        with delegated_by(callers["orchestrator"].fetch_jwt(AUD)):  # a caller token is not a link
            not_a_link = await client.authorize("echo", {})
    assert (seen(chained)["spiffe_id"], seen(chained)["delegation"]) == (RESEARCH_ID, [ORCHESTRATOR_ID, PLANNER_ID])
    record = record_of(tmp_path / "evidence", chained)
    assert [link["spiffe_id"] for link in record["delegation"]] == [ORCHESTRATOR_ID, PLANNER_ID]
    for refused in (dropped, not_a_link):
        assert refused.outcome == "deny"
        assert refused.reasons[0].startswith("unverified_caller: delegation[0]: "), refused.reasons


async def test_an_expired_spire_jwt_svid_is_refused(node, sidecar):
    agent, _ = node
    courier = agent.workload("courier")
    agent.register("/ns/agents/sa/courier", *courier.selectors, jwt_ttl=2)
    courier.wait_for_identity()
    token = courier.fetch_jwt(AUD)
    expires = claims(token)["exp"]
    assert expires - claims(token)["iat"] <= 2  # SPIRE applied the entry's JWT-SVID TTL
    async with AsyncClient(unix_target(sidecar), metadata=bearer(token)) as client:
        assert (await client.authorize("echo", {})).outcome == "allow"
        await asyncio.sleep(max(0.0, expires - time.time()) + 0.5)
        refused = await client.authorize("echo", {})
    assert refused.outcome == "deny" and "jwt_svid: the token expired at" in refused.reasons[0]


async def test_the_agent_side_client_library_with_spire(node, sidecar):
    """SpiffeMtls and JwtSvidAuth take their credentials from the agent, as an agent pod would.

    Run in this process, they get this process's registration: the sidecar's ID.
    """
    agent, _ = node
    source = await asyncio.to_thread(X509Source, socket_path=agent.endpoint, timeout_in_seconds=10)
    try:
        async with AsyncClient(tls_target(sidecar), credentials=SpiffeMtls(source, SIDECAR_DNS)) as client:
            got = seen(await client.authorize("echo", {}))
        assert (got["spiffe_id"], got["source"]) == (SIDECAR_ID, "mtls")
    finally:
        source.close()
    with WorkloadApiClient(agent.endpoint) as workload_api:
        async with AsyncClient(unix_target(sidecar), metadata=JwtSvidAuth(AUD, source=workload_api)) as client:
            got = seen(await client.authorize("echo", {}))
    assert (got["spiffe_id"], got["source"]) == (SIDECAR_ID, "jwt_svid")
    # py-spiffe's other JWT source names its fetch differently; JwtSvidAuth takes either.
    jwt_source = await asyncio.to_thread(JwtSource, socket_path=agent.endpoint, timeout_in_seconds=10)
    try:
        async with AsyncClient(unix_target(sidecar), metadata=JwtSvidAuth(AUD, source=jwt_source)) as client:
            got = seen(await client.authorize("echo", {}))
        assert (got["spiffe_id"], got["source"]) == (SIDECAR_ID, "jwt_svid")
    finally:
        jwt_source.close()
    with pytest.raises(TypeError, match="JwtSource or WorkloadApiClient, not X509Source"):
        JwtSvidAuth(AUD, source=source)


# Escalates every call; allows a call that carries an approval.
APPROVAL_POLICY = """\
    package sidecar

    default decision := {"outcome": "escalate", "reasons": ["needs_person: a person decides"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["approved"], "obligations": {}} if input.approval != null
"""


async def test_the_pod_identity_spire_gives_every_container_never_approves(node, tmp_path, running_sidecar):
    """SPIRE registers the pod for the sidecar's identity, so every process of the pod, the agent included,
    gets it from its Workload API (here this process, which the registration matches as it does the
    sidecar): it is the caller on the unix socket, and it is what an X.509-SVID over mTLS or a JWT-SVID
    of its own names. Even listed in escalation.approvers it never decides, relays nor reads an escalation
    (approver_not_verified); the planner's own call is decided by a person with an identity of their own."""
    agent, callers = node
    approver = agent.workload("approver")
    agent.register("/humans/approver-bot", *approver.selectors)
    approver.wait_for_identity()
    started = await running_sidecar(sidecar_settings(tmp_path, agent, overrides={
        "policy.dir": str(write_policy(tmp_path / "approval-rego", APPROVAL_POLICY)),
        "escalation.approvers": [SIDECAR_ID, f"spiffe://{TD}/humans/approver-bot"],
        "escalation.console_identities": [SIDECAR_ID],
    }))
    await wait_health(started, health_pb2.HealthCheckResponse.SERVING)
    planner = bearer(callers["planner"].fetch_jwt(AUD))
    async with AsyncClient(unix_target(started), metadata=planner) as client:
        escalated = await client.authorize("send_email", {"to": "cfo@example.com"})
    assert escalated.outcome == "escalate", escalated.reasons

    with WorkloadApiClient(agent.endpoint) as workload_api:
        own_jwt = workload_api.fetch_jwt_svid(audience={AUD}).token
        own = workload_api.fetch_x509_svid()
        bundle = workload_api.fetch_x509_bundles().get_bundle_for_trust_domain(own.spiffe_id.trust_domain)
    pem = serialization.Encoding.PEM
    mtls = grpc.ssl_channel_credentials(
        b"".join(ca.public_bytes(pem) for ca in bundle.x509_authorities),
        own.private_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        b"".join(cert.public_bytes(pem) for cert in own.cert_chain),
    )
    ways = {
        "workload_api": ApprovalsClient(unix_target(started)),
        "jwt_svid": ApprovalsClient(unix_target(started), metadata=bearer(own_jwt)),
        "mtls": ApprovalsClient(tls_target(started), credentials=mtls,
                                options=[("grpc.ssl_target_name_override", SIDECAR_DNS)]),
    }
    for way, pod in ways.items():
        async with pod:
            for name, attempt in {"approve": pod.approve(escalated.escalation_id, note="me"),
                                  "relay a person": pod.approve(escalated.escalation_id, approver="email:a@example.org"),
                                  "list": pod.list()}.items():
                with pytest.raises(ApprovalsError) as info:
                    await attempt
                assert info.value.code == "approver_not_verified", (way, name, info.value)
                assert f"{SIDECAR_ID} ({way}) is the pod identity" in info.value.message, (way, name)

    async with AsyncClient(unix_target(started), metadata=planner) as client:
        assert (await client.authorize("send_email", {"to": "cfo@example.com"},
                                       escalation_id=escalated.escalation_id)).outcome == "escalate"
    async with ApprovalsClient(unix_target(started), metadata=bearer(approver.fetch_jwt(AUD))) as person:
        await person.approve(escalated.escalation_id, note="checked")
    async with AsyncClient(unix_target(started), metadata=planner) as client:
        assert (await client.authorize("send_email", {"to": "cfo@example.com"},
                                       escalation_id=escalated.escalation_id)).outcome == "allow"


async def test_the_sidecar_starts_before_the_agent_and_serves_once_it_is_up(
    spire, node, tmp_path, running_sidecar
):
    _, callers = node
    planner = callers["planner"].fetch_x509()  # from another agent of the same trust domain
    agent = spire.agent("late", start=False)
    register_sidecar(agent)
    sidecar = await running_sidecar(sidecar_settings(tmp_path, agent))  # no agent socket yet: starts anyway
    detail = await wait_health(sidecar, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert "does not exist yet" in detail
    async with AsyncClient(unix_target(sidecar)) as client:
        refused = await client.authorize("echo", {})
        assert refused.outcome == "deny"
        assert refused.reasons[0].startswith("unverified_caller: workload_api: no X.509-SVID from the Workload API")
        assert record_of(tmp_path / "evidence", refused)["subject"] is None
        # Without its SVID the mTLS listener presents a placeholder nobody trusts.
        async with mtls_client(sidecar, planner) as tls_client:
            with pytest.raises(grpc.RpcError) as info:
                await tls_client.authorize("echo", {})
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        agent.start()
        await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
        allowed = await client.authorize("echo", {})
    assert allowed.outcome == "allow" and seen(allowed)["spiffe_id"] == SIDECAR_ID
    async with mtls_client(sidecar, planner) as tls_client:
        assert seen(await tls_client.authorize("echo", {}))["spiffe_id"] == PLANNER_ID


def test_missing_spire_binaries_fail_saying_how_to_build_them(monkeypatch, tmp_path):
    import tests.infra.spire as infra

    monkeypatch.setattr(infra, "BIN", tmp_path)
    with pytest.raises(SpireUnavailable, match=r"spire-server is not built .*run `make install`.*SPIRE v1\.13\.3"):
        SpireServer(TD)
    with pytest.raises(pytest.fail.Exception, match="make install"):
        start_spire()
