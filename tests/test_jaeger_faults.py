"""Jaeger refusing or hanging: decisions are answered as policy says, the span is late, the log says why once.

The faults are the real Jaeger's: not started (connections refused), and
stopped with SIGSTOP (it keeps its socket but answers nothing, like a hung
collector). A port that answers bytes that are not OTLP needs a double
(tests/doubles/otlp_receiver.py GarbageListener) until Jaeger takes it over;
a collector answering OTLP errors is in tests/test_evidence_otel.py.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.client import AsyncClient
from tests.conftest import SIMPLE_POLICY, write_policy
from tests.doubles.otlp_receiver import GarbageListener
from tests.infra import jaeger as infra
from tests.infra.jaeger import Jaeger, clean_otel_env, wait_until_async  # noqa: F401 (fixture)

SHIPPER_LOG = "sidecar.evidence.shipper"


async def serving(sidecar) -> bool:
    await sidecar.health.refresh()
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def config_for(tmp_path, sidecar_config, jaeger: Jaeger, service: str):
    return sidecar_config(**jaeger.telemetry_settings(service), **{
        "policy.dir": str(write_policy(tmp_path / "policy", SIMPLE_POLICY)),
        "evidence.dir": str(tmp_path / "ev"),
    })


def failures(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == SHIPPER_LOG and "export failed" in r.getMessage()]


async def test_jaeger_refusing_connections_delays_spans_not_decisions(tmp_path, running_sidecar, sidecar_config,
                                                                       clean_otel_env, caplog):
    caplog.set_level(logging.INFO, logger=SHIPPER_LOG)
    jaeger = Jaeger(tmp_path / "jaeger")  # its ports are chosen, it is not started: connections are refused
    try:
        sidecar = await running_sidecar(config_for(tmp_path, sidecar_config, jaeger, "sidecar-refused"))
        async with AsyncClient(sidecar.addresses[0]) as agent:
            early = [await agent.authorize("echo", {"n": n}) for n in range(5)]
            assert await wait_until_async(lambda: failures(caplog)), "no log line says the export fails"
            late = [await agent.authorize("echo", {"n": n}) for n in range(5, 10)]
        assert [r.outcome for r in early + late] == ["allow"] * 10
        assert await serving(sidecar), "an unreachable collector does not make the sidecar unhealthy"
        (line,) = failures(caplog)
        assert line.levelno == logging.WARNING and "retrying" in line.getMessage()

        jaeger.start()
        for result in early + late:
            assert await wait_until_async(lambda: jaeger.trace(result.trace_id)), result.trace_id
        assert len(failures(caplog)) == 1, "the outage is reported once, not per retry"
        assert "export works again" in caplog.text
    finally:
        jaeger.close()


async def test_jaeger_hanging_delays_spans_not_decisions(tmp_path, running_sidecar, sidecar_config,
                                                         clean_otel_env, caplog):
    caplog.set_level(logging.INFO, logger=SHIPPER_LOG)
    with Jaeger(tmp_path / "jaeger") as jaeger:
        sidecar = await running_sidecar(config_for(tmp_path, sidecar_config, jaeger, "sidecar-hung"))
        async with AsyncClient(sidecar.addresses[0]) as agent:
            before = await agent.authorize("echo", {"n": 0})
            assert await wait_until_async(lambda: jaeger.trace(before.trace_id))
            jaeger.pause()
            try:
                during = [await agent.authorize("echo", {"n": n}) for n in range(1, 21)]
                assert [r.outcome for r in during] == ["allow"] * 20
                assert await wait_until_async(lambda: failures(caplog)), "no log line says the export fails"
                assert await serving(sidecar)
                assert not failures(caplog)[0].exc_info, "a clear line, not a traceback"
            finally:
                jaeger.resume()
        for result in during:
            assert await wait_until_async(lambda: jaeger.trace(result.trace_id)), result.trace_id
        assert len(failures(caplog)) == 1


def test_a_missing_jaeger_binary_fails_and_says_make_install_builds_it(tmp_path, monkeypatch):
    monkeypatch.setattr(infra, "BINARY", tmp_path / "no-jaeger")
    with pytest.raises(infra.JaegerMissing, match=r"`make install` builds it"):
        Jaeger(tmp_path / "jaeger")


async def test_a_collector_port_answering_garbage_delays_spans_until_jaeger_answers_there(
        tmp_path, running_sidecar, sidecar_config, clean_otel_env, caplog):
    caplog.set_level(logging.INFO, logger=SHIPPER_LOG)
    garbage = GarbageListener()
    jaeger = Jaeger(tmp_path / "jaeger", ports={"otlp_grpc": garbage.port})
    try:
        sidecar = await running_sidecar(config_for(tmp_path, sidecar_config, jaeger, "sidecar-garbage"))
        async with AsyncClient(sidecar.addresses[0]) as agent:
            results = [await agent.authorize("echo", {"n": n}) for n in range(5)]
            assert await wait_until_async(lambda: failures(caplog)), "no log line says the export fails"
            assert garbage.connections > 0
            results.append(await agent.authorize("echo", {"n": 5}))
        assert [r.outcome for r in results] == ["allow"] * 6
        assert await serving(sidecar)
        garbage.close()
        jaeger.start()  # the real collector now answers on that port
        for result in results:
            assert await wait_until_async(lambda: jaeger.trace(result.trace_id)), result.trace_id
        assert len(failures(caplog)) == 1 and "export works again" in caplog.text
    finally:
        garbage.close()
        jaeger.close()
