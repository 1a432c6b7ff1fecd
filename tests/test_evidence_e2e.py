"""Evidence through the real gRPC server: records, spans in the real Jaeger with the response's trace id, a full disk denies."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.client import AsyncClient
from sidecar.evidence.verify import verify_dir
from sidecar.v1 import sidecar_pb2_grpc
from sidecar.client import build_request
from tests.conftest import SIMPLE_POLICY, write_policy
from tests.infra.jaeger import Jaeger, clean_otel_env, wait_until_async  # noqa: F401 (fixture)

SERVICE = "sidecar-evidence-e2e"


@pytest.fixture
def jaeger(tmp_path):
    with Jaeger(tmp_path / "jaeger") as running:
        yield running


@pytest.fixture
async def evidence_sidecar(tmp_path, running_sidecar, sidecar_config, jaeger, clean_otel_env):
    policy = write_policy(tmp_path / "rego", SIMPLE_POLICY)
    config = sidecar_config(**jaeger.telemetry_settings(SERVICE),
                            **{"policy.dir": str(policy), "evidence.dir": str(tmp_path / "ev")})
    return await running_sidecar(config)


def read_records(directory) -> list[dict]:
    records = []
    for path in sorted(directory.glob("evidence-*.jsonl")):
        records.extend(json.loads(line) for line in path.read_bytes().splitlines())
    return records


async def test_each_authorize_leaves_a_record_and_a_span_with_the_response_ids(evidence_sidecar, jaeger, tmp_path):
    sidecar = evidence_sidecar
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with AsyncClient(sidecar.addresses[0]) as client:
        allowed = await client.authorize("echo", {"text": "hi", "password": "pw-1"}, task_id="t-1")
        denied = await client.authorize("rm_everything", {})
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        traced = await stub.Authorize(
            build_request("echo", {}), metadata=(("traceparent", f"00-{parent_trace}-{parent_span}-01"),)
        )
    assert allowed.outcome == "allow" and denied.outcome == "deny"

    records = {r.get("decision_id"): r for r in read_records(tmp_path / "ev") if r["kind"] == "decision"}
    for result in (allowed, denied):
        record = records[result.decision_id]
        assert record["outcome"] == result.outcome and record["reasons"] == list(result.reasons)
        assert record["trace_id"] == result.trace_id
        assert record["subject"]["source"] == "dev" and record["sidecar"] == "test-sidecar"
        assert record["policy_revision"] == result.policy_revision
    assert b"pw-1" not in b"".join(p.read_bytes() for p in (tmp_path / "ev").glob("evidence-*"))
    assert records[traced.decision_id]["parent_span_id"] == parent_span
    assert records[traced.decision_id]["trace_id"] == parent_trace == traced.trace_id

    def decision_spans() -> dict:
        spans = [s for result in (allowed, denied, traced) for s in jaeger.trace(result.trace_id)]
        return {s.tags["sidecar.decision.id"]: s for s in spans if s.name.startswith("execute_tool")}

    ids = {r.decision_id for r in (allowed, denied, traced)}
    spans = await wait_until_async(lambda: (found := decision_spans()).keys() >= ids and found)
    assert spans, "the decisions' spans did not reach Jaeger"
    assert spans[allowed.decision_id].trace_id == allowed.trace_id  # found in Jaeger by the response's trace id
    assert spans[traced.decision_id].parent_span_id == parent_span
    assert spans[allowed.decision_id].process["service.instance.id"] == "test-sidecar"
    assert verify_dir(tmp_path / "ev").ok


async def test_a_full_disk_denies_calls_and_marks_the_sidecar_not_serving(
    tmp_path, tiny_volume, running_sidecar, sidecar_config, jaeger, clean_otel_env
):
    # evidence.dir on a 256 KiB tmpfs that the test fills; the mirror and the escalation store live off it
    directory = tiny_volume.path / "ev"
    policy = write_policy(tmp_path / "rego", SIMPLE_POLICY)
    sidecar = await running_sidecar(sidecar_config(**jaeger.telemetry_settings(SERVICE), **{
        "policy.dir": str(policy), "evidence.dir": str(directory),
        "evidence.checkpoint_mirror": str(tmp_path / "cp.jsonl"), "escalation.path": str(tmp_path / "esc.db"),
    }))
    tiny_volume.fill()
    async with AsyncClient(sidecar.addresses[0]) as client:
        # an intent of MAX_INTENT_BYTES: the record needs a new block, whatever room the file's last page has
        result = await client.authorize("echo", {"text": "hi"}, intent="x" * 4096)
        assert result.outcome == "deny"
        assert result.reasons[0].startswith("evidence_unavailable:")
        await sidecar.health.refresh()
        async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING

        tiny_volume.free()
        again = await client.authorize("echo", {"text": "hi"})
        assert again.outcome == "allow"
        await sidecar.health.refresh()
        async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    ids = [r.get("decision_id") for r in read_records(directory)]
    assert result.decision_id not in ids and again.decision_id in ids
    assert verify_dir(directory).ok
