"""End to end: a real gRPC sidecar with `policy.engine: opa`, deciding through the OPA TEST DOUBLE.

(No OPA binary can be installed here: tests/doubles/opa_server.py plays OPA.)
The agent's client sees allow while OPA answers, a deny naming OPA while it
is down, and allow again when it is back; the health service follows OPA.
"""

from __future__ import annotations

import dataclasses
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.client import AsyncClient
from sidecar.config import Config
from sidecar.policy.opa import OpaEngine
from sidecar.server import build_engine
from tests.conftest import REGO
from tests.doubles.opa_server import OpaTestServer


@pytest.fixture
async def opa():
    async with OpaTestServer(REGO) as server:
        yield server


def opa_config(sidecar_config, tmp_path, opa_url: str) -> Config:
    overrides = {
        "policy.engine": "opa",
        "policy.opa": {"url": opa_url, "health_interval_ms": 50, "breaker_cooldown_ms": 200},
    }
    sections = {f.name for f in dataclasses.fields(Config)}
    if "evidence" in sections:
        overrides["evidence.dir"] = str(tmp_path / "evidence")
    if "telemetry" in sections:
        overrides["telemetry.exporter"] = "none"
    return sidecar_config(**overrides)


def test_build_engine_selects_opa(sidecar_config, tmp_path):
    config = opa_config(sidecar_config, tmp_path, "http://127.0.0.1:8181")
    engine = build_engine(config)
    assert isinstance(engine, OpaEngine) and engine.name == "opa"
    assert engine.url == "http://127.0.0.1:8181"
    assert type(build_engine(sidecar_config())).__name__ == "EmbeddedEngine"


def evidence_records(tmp_path) -> list[dict]:
    records = []
    for path in sorted((tmp_path / "evidence").glob("evidence-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


async def health_status(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return response.status


async def test_decisions_through_the_sidecar_follow_opa(running_sidecar, sidecar_config, tmp_path, opa):
    sidecar = await running_sidecar(opa_config(sidecar_config, tmp_path, opa.url))
    assert sidecar.engine.name == "opa"
    address = sidecar.addresses[0]
    async with AsyncClient(address) as client:
        result = await client.authorize("search_docs", {"query": "sidecar"})
        assert result.outcome == "allow", result
        assert result.policy_revision == sidecar.engine.revision
        assert opa.data_requests == 1
        sent = opa.inputs[-1]
        assert sent["tool"]["name"] == "search_docs" and sent["version"] == "sidecar/v1"
        assert sent["tool"]["catalog"] == sidecar.engine.catalog_entry("search_docs")  # from the local bundle
        await sidecar.health.refresh()
        assert await health_status(address) == health_pb2.HealthCheckResponse.SERVING
        allowed_record = next(r for r in evidence_records(tmp_path) if r.get("decision_id") == result.decision_id)
        assert allowed_record["engine_decision_id"]  # OPA's decision_id: joins OPA's decision logs

        await opa.stop()
        denied = await client.authorize("search_docs", {"query": "sidecar"})
        assert denied.outcome == "deny"
        assert denied.reasons[0].startswith(f"policy_unavailable: OPA at {opa.url} ")
        if sidecar.recorder is not None:  # recorded (durably, before the answer) with the engine error
            record = next(r for r in evidence_records(tmp_path) if r.get("decision_id") == denied.decision_id)
            assert record["outcome"] == "deny" and record["engine"] == "opa"
            assert record["engine_error"] == denied.reasons[0]
        await sidecar.engine.check_health()
        await sidecar.health.refresh()
        assert await health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING

        await opa.start()  # same port: recovers by itself
        again = await client.authorize("search_docs", {"query": "sidecar"})
        assert again.outcome == "allow", again
        await sidecar.engine.check_health()
        await sidecar.health.refresh()
        assert await health_status(address) == health_pb2.HealthCheckResponse.SERVING


async def test_wrong_shape_answer_is_a_deny_through_the_sidecar(running_sidecar, sidecar_config, tmp_path, opa):
    sidecar = await running_sidecar(opa_config(sidecar_config, tmp_path, opa.url))
    opa.result = {"outcome": "allow"}  # no reasons: never an allow by accident
    async with AsyncClient(sidecar.addresses[0]) as client:
        result = await client.authorize("search_docs", {"query": "sidecar"})
    assert result.outcome == "deny"
    assert result.reasons[0].startswith(f"policy_malformed: OPA at {opa.url} ")
