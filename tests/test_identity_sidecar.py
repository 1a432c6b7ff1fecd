"""Identity end to end: the real sidecar (start_sidecar), ToolGate.Authorize, a fake SPIRE agent.

What the issue asks of every mode, through the whole pipeline: the subject
policy sees (`input.subject`, `input.delegation`), denials with a reason that
are recorded as evidence, health NOT_SERVING until an SVID is held, and the
agent-side client (`SpiffeMtls`, `JwtSvidAuth`, `delegated_by`).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from spiffe import WorkloadApiClient, X509Source

from sidecar.client import AsyncClient, Client, JwtSvidAuth, SpiffeMtls, delegated_by
from sidecar.config import load_config
from sidecar.identity.delegation import link_audience
from tests.conftest import write_policy
from tests.doubles.fake_workload_api import FakeWorkloadApi
from tests.doubles.identity_harness import SIDECAR_DNS, fake_agent, remove_dir, short_dir

SIDECAR_ID = "spiffe://example.org/ns/agents/sa/sidecar"
PLANNER = "spiffe://example.org/ns/agents/sa/planner"
ORCHESTRATOR = "spiffe://example.org/ns/agents/sa/orchestrator"
AUD = SIDECAR_ID
DELEGATION = "spiffe://example.org/agent-sidecar/delegation"

# Allows `echo` and echoes what policy saw of the caller into the reason.
IDENTITY_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    # concat, not sprintf: regopy mangles an empty string computed by a rule inside sprintf.
    decision := {"outcome": "allow", "obligations": {}, "reasons": [concat("|", [
        input.subject.spiffe_id, input.subject.source, input.subject.trust_domain,
        input.subject.path, input.subject.svid_expires_at,
        concat(">", [d.spiffe_id | some d in input.delegation])])]} if {
        input.tool.name == "echo"
    }
"""


def seen(result) -> dict:
    spiffe_id, source, td, path, expires, chain = result.reasons[0].split("|")
    return {"spiffe_id": spiffe_id, "source": source, "trust_domain": td, "path": path,
            "svid_expires_at": expires, "delegation": chain.split(">") if chain else []}


@pytest.fixture
def sockdir():
    d = short_dir()
    yield d
    remove_dir(d)


@pytest.fixture
def make_config(tmp_path, sockdir):
    policy = write_policy(tmp_path / "rego", IDENTITY_POLICY)

    def make(**identity):
        settings = {
            "listen.tcp": "127.0.0.1:0",
            "listen.unix": f"{sockdir}/sidecar.sock",
            "policy.dir": str(policy),
            "policy.reload": False,
            "sidecar.instance_id": "identity-test",
            "evidence.dir": str(tmp_path / "evidence"),
            "escalation.path": str(tmp_path / "escalations.db"),
            "telemetry.exporter": "none",
            "identity.sources": ["jwt_svid", "mtls", "workload_api"],
            "identity.workload_api_socket": f"unix://{sockdir}/agent.sock",
            "identity.jwt_audience": AUD,
            "identity.delegation_audience": DELEGATION,
            "identity.workload_api_max_backoff_ms": 100,
            "escalation.approvers": ["email:*@example.org"],
        }
        settings.update({f"identity.{k}": v for k, v in identity.items()})
        return load_config(None, settings)

    return make


def records(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("evidence-*.jsonl")):
        out.extend(json.loads(line) for line in path.read_bytes().splitlines())
    return [r for r in out if r.get("kind") == "decision"]


async def health(sidecar) -> tuple[int, str]:
    async with grpc.aio.insecure_channel(sidecar.addresses[-1]) as channel:
        call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        reply = await call
        detail = dict(await call.trailing_metadata()).get("sidecar-health-detail", "")
        return reply.status, detail


async def wait_health(sidecar, status, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got, detail = await health(sidecar)
        if got == status or time.monotonic() > deadline:
            assert got == status, detail
            return detail
        await asyncio.sleep(0.1)


def unix_target(sidecar) -> str:
    return next(a for a in sidecar.addresses if a.startswith("unix:"))


def tls_target(sidecar) -> str:
    return next(a for a in sidecar.addresses if not a.startswith("unix:"))


async def test_startup_before_the_agent_then_serving(make_config, sockdir, running_sidecar, tmp_path):
    sidecar = await running_sidecar(make_config())  # no agent socket yet: starts anyway
    detail = await wait_health(sidecar, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert "does not exist yet" in detail
    async with AsyncClient(unix_target(sidecar)) as client:
        denied = await client.authorize("echo", {})
    assert denied.outcome == "deny"
    assert denied.reasons[0].startswith("unverified_caller: workload_api: no X.509-SVID from the Workload API")
    record = next(r for r in records(tmp_path / "evidence") if r["decision_id"] == denied.decision_id)
    assert record["subject"] is None and record["outcome"] == "deny"

    agent = fake_agent(sockdir, path="/ns/agents/sa/sidecar")
    try:
        await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
        async with AsyncClient(unix_target(sidecar)) as client:
            allowed = await client.authorize("echo", {})
        assert allowed.outcome == "allow"
        assert seen(allowed) == {
            "spiffe_id": SIDECAR_ID, "source": "workload_api", "trust_domain": "example.org",
            "path": "/ns/agents/sa/sidecar", "delegation": [],
            "svid_expires_at": agent.svids[0].cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        record = next(r for r in records(tmp_path / "evidence") if r["decision_id"] == allowed.decision_id)
        assert record["subject"]["spiffe_id"] == SIDECAR_ID and record["subject"]["source"] == "workload_api"
    finally:
        agent.stop()


@pytest.fixture
async def world(make_config, sockdir, running_sidecar):
    agent = fake_agent(sockdir, path="/ns/agents/sa/sidecar")
    # The agent's own SPIRE socket: same trust domain (same CA and JWT key), its own identity.
    caller = FakeWorkloadApi(f"{sockdir}/caller.sock", ca=agent.ca, jwt_authority=agent.jwt_authority).start()
    caller.set_identity("/ns/agents/sa/planner")
    caller.publish_jwt_bundles()
    sidecar = await running_sidecar(make_config())
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
    yield agent, caller, sidecar
    caller.stop()
    agent.stop()


async def test_every_mode_through_authorize(world, tmp_path):
    agent, caller, sidecar = world
    # workload_api: the pod identity on the unix socket
    async with AsyncClient(unix_target(sidecar)) as client:
        assert seen(await client.authorize("echo", {}))["source"] == "workload_api"

    # jwt_svid: the caller's own JWT-SVID from its Workload API, on the same socket
    with WorkloadApiClient(caller.endpoint, default_timeout=5) as wl:
        auth = JwtSvidAuth(AUD, source=wl)
        async with AsyncClient(unix_target(sidecar), metadata=auth) as client:
            got = seen(await client.authorize("echo", {}))
        assert (got["spiffe_id"], got["source"]) == (PLANNER, "jwt_svid")

        # delegation: upstream agents' JWT-SVIDs ride along, outermost first, each minted for its
        # place: orchestrator -> planner -> the pod (the caller on the unix socket, no token)
        orchestrator = agent.jwt_authority.mint(ORCHESTRATOR, link_audience(DELEGATION, to=PLANNER))
        planner_link = wl.fetch_jwt_svid(
            audience={link_audience(DELEGATION, to=SIDECAR_ID, from_=ORCHESTRATOR)}).token
        async with AsyncClient(unix_target(sidecar)) as client:
            with delegated_by(orchestrator, planner_link):
                chained = await client.authorize("echo", {})
            # the planner's own caller token (audience: the sidecar) is not a delegation link
            with delegated_by(wl.fetch_jwt_svid(audience={AUD}).token):
                refused = await client.authorize("echo", {})
        assert seen(chained)["delegation"] == [ORCHESTRATOR, PLANNER]
        assert seen(chained)["spiffe_id"] == SIDECAR_ID
        assert refused.outcome == "deny"
        assert refused.reasons[0].startswith(
            "unverified_caller: delegation[0]: the link is not bound to this place in the chain"), refused.reasons

    # mtls: the caller's X.509-SVID from an X509Source, verified by the sidecar
    with X509Source(socket_path=caller.endpoint, timeout_in_seconds=5) as x509_source:
        async with AsyncClient(tls_target(sidecar), credentials=SpiffeMtls(x509_source, SIDECAR_DNS)) as client:
            got = seen(await client.authorize("echo", {}))
    assert (got["spiffe_id"], got["source"]) == (PLANNER, "mtls")

    chain = [r for r in records(tmp_path / "evidence") if r.get("delegation")]
    assert [d["spiffe_id"] for d in chain[0]["delegation"]] == [ORCHESTRATOR, PLANNER]
    sources = {r["subject"]["source"] for r in records(tmp_path / "evidence") if r["subject"]}
    assert sources == {"workload_api", "jwt_svid", "mtls"}


async def test_bad_credentials_are_denied_recorded_and_the_server_lives(world, tmp_path):
    agent, _, sidecar = world
    cases = {
        "expired": (agent.jwt_authority.mint(PLANNER, AUD, ttl=-5), "jwt_svid: the token expired at"),
        "oversized": (agent.jwt_authority.mint(PLANNER, AUD, extra_claims={"pad": "x" * 9000}),
                      "jwt_svid: the token is"),
        "wrong audience": (agent.jwt_authority.mint(PLANNER, "elsewhere"), "jwt_svid: the token's audience"),
        "upper-case": (agent.jwt_authority.mint("spiffe://Example.org/a/b", AUD),
                       "is not a valid SPIFFE ID"),
    }
    async with grpc.aio.insecure_channel(unix_target(sidecar)) as channel:
        from sidecar.client import build_request, result_from_response
        from sidecar.v1 import sidecar_pb2_grpc

        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        for name, (token, reason) in cases.items():
            reply = result_from_response(await stub.Authorize(
                build_request("echo", {}), metadata=(("authorization", f"Bearer {token}"),), timeout=5))
            assert reply.outcome == "deny", name
            assert reply.reasons[0].startswith("unverified_caller: ") and reason in reply.reasons[0], name
            record = next(r for r in records(tmp_path / "evidence") if r["decision_id"] == reply.decision_id)
            assert record["subject"] is None and reason in record["reasons"][0]
    # TLS without a client certificate never reaches the servicer
    with Client(tls_target(sidecar), credentials=grpc.ssl_channel_credentials(agent.ca.bundle_pem()),
                options=[("grpc.ssl_target_name_override", SIDECAR_DNS)]) as client:
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(client.authorize, "echo", {})
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    async with AsyncClient(unix_target(sidecar)) as client:
        assert (await client.authorize("echo", {})).outcome == "allow"


async def test_withdrawal_and_rotation_through_the_sidecar(world):
    agent, caller, sidecar = world
    async with AsyncClient(unix_target(sidecar)) as client:
        agent.withdraw()
        await wait_health(sidecar, health_pb2.HealthCheckResponse.NOT_SERVING)
        denied = await client.authorize("echo", {})
        assert denied.reasons[0].startswith("unverified_caller: workload_api: the Workload API withdrew")
        new = agent.set_identity("/ns/agents/sa/sidecar", ttl=5400)[0]
        await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
        got = seen(await client.authorize("echo", {}))
        assert got["svid_expires_at"] == new.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    # The client side follows its own rotation: a new channel presents the new SVID.
    with X509Source(socket_path=caller.endpoint, timeout_in_seconds=5) as x509_source:
        with Client(tls_target(sidecar), credentials=SpiffeMtls(x509_source, SIDECAR_DNS)) as client:
            # (the sync client, in a thread: the sidecar shares this event loop)
            first = seen(await asyncio.to_thread(client.authorize, "echo", {}))["svid_expires_at"]
            new = caller.rotate(ttl=9000)[0]
            deadline = time.monotonic() + 5
            while x509_source.get_x509_context().default_svid.leaf.serial_number != new.serial:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            second = seen(await asyncio.to_thread(client.authorize, "echo", {}))["svid_expires_at"]
    assert second == new.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") != first
