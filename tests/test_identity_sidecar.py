"""Identity end to end with credentials SPIRE will not issue: the real sidecar, a fake SPIRE agent.

Every mode against the real SPIRE (the sidecar's SVID and bundles, mTLS,
JWT-SVIDs and delegation, wrong audience, expiry, rotation, withdrawal, the
agent-side client) is in tests/test_spire_*.py. What is left here needs the
test double (tests/doubles/fake_workload_api.py) because SPIRE cannot mint
it: oversized and upper-case-ID tokens, signed by the trust domain's own key,
must be denied, recorded, and leave the server serving.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.client import AsyncClient
from sidecar.config import load_config
from tests.conftest import LOADED_MACHINE, write_policy
from tests.doubles.identity_harness import fake_agent, remove_dir, short_dir

SIDECAR_ID = "spiffe://example.org/ns/agents/sa/sidecar"
PLANNER = "spiffe://example.org/ns/agents/sa/planner"
AUD = SIDECAR_ID
DELEGATION = "spiffe://example.org/agent-sidecar/delegation"

# Allows `echo` and echoes what policy saw of the caller into the reason.
IDENTITY_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    # concat: every field in one reason, an empty one as an empty segment.
    decision := {"outcome": "allow", "obligations": {}, "reasons": [concat("|", [
        input.subject.spiffe_id, input.subject.source, input.subject.trust_domain,
        input.subject.path, input.subject.svid_expires_at,
        concat(">", [d.spiffe_id | some d in input.delegation])])]} if {
        input.tool.name == "echo"
    }
"""


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
            **LOADED_MACHINE,  # room for a loaded machine: identity is under test, not policy speed
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


async def wait_health(sidecar, status, timeout: float = 60.0) -> str:  # as soon as it holds; room for a loaded machine
    deadline = time.monotonic() + timeout
    while True:
        got, detail = await health(sidecar)
        if got == status or time.monotonic() > deadline:
            assert got == status, detail
            return detail
        await asyncio.sleep(0.1)


def unix_target(sidecar) -> str:
    return next(a for a in sidecar.addresses if a.startswith("unix:"))


@pytest.fixture
async def world(make_config, sockdir, running_sidecar):
    agent = fake_agent(sockdir, path="/ns/agents/sa/sidecar")
    sidecar = await running_sidecar(make_config())
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
    yield agent, sidecar
    agent.stop()


async def test_bad_credentials_are_denied_recorded_and_the_server_lives(world, tmp_path):
    agent, sidecar = world
    cases = {
        "oversized": (agent.jwt_authority.mint(PLANNER, AUD, extra_claims={"pad": "x" * 9000}),
                      "jwt_svid: the token is"),
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
    async with AsyncClient(unix_target(sidecar)) as client:
        assert (await client.authorize("echo", {})).outcome == "allow"
