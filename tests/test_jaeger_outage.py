"""Jaeger stopped during load and started again: every span arrives, none twice.

Jaeger keeps its traces on disk (badger storage), so what it stored before the
stop is still there after the restart; and its `debug` exporter logs every
span its pipeline receives, over both runs, so a span delivered twice would
show (storage cannot: badger overwrites a span with the same key, and the
query service de-duplicates). See tests/infra/jaeger.py.
"""

from __future__ import annotations

import asyncio
import logging

from sidecar.client import AsyncClient
from tests.conftest import SIMPLE_POLICY, write_policy
from tests.doubles.escalation import records
from tests.infra.jaeger import Jaeger, clean_otel_env, wait_until_async  # noqa: F401 (fixture)

SERVICE = "sidecar-outage-test"
SHIPPER_LOG = "sidecar.evidence.shipper"


async def test_jaeger_stopped_during_load_receives_every_span_once(tmp_path, running_sidecar, sidecar_config,
                                                                   clean_otel_env, caplog):
    caplog.set_level(logging.INFO, logger=SHIPPER_LOG)
    with Jaeger(tmp_path / "jaeger", storage="badger", log_spans=True) as jaeger:
        config = sidecar_config(**jaeger.telemetry_settings(SERVICE), **{
            "policy.dir": str(write_policy(tmp_path / "policy", SIMPLE_POLICY)),
            "evidence.dir": str(tmp_path / "ev"),
        })
        sidecar = await running_sidecar(config)
        results = []
        done = asyncio.Event()

        async def load():
            async with AsyncClient(sidecar.addresses[0]) as agent:
                while not done.is_set():
                    results.append(await agent.authorize("echo", {"n": len(results)}))
                    await asyncio.sleep(0.005)

        task = asyncio.create_task(load())
        try:
            assert await wait_until_async(lambda: len(jaeger.received()) >= 20), "no spans before the outage"
            jaeger.stop()
            stopped_at = len(results)
            assert await wait_until_async(lambda: "export failed" in caplog.text), "the shipper never noticed"
            assert await wait_until_async(lambda: len(results) >= stopped_at + 50)
            started_at = len(results)
            jaeger.start()
            assert await wait_until_async(lambda: len(results) >= started_at + 50)
        finally:
            done.set()
            await task
        assert {r.outcome for r in results} == {"allow"}, "a decision failed while Jaeger was away"

        decisions = [r for r in records(tmp_path / "ev") if r["kind"] == "decision"]
        assert [r["decision_id"] for r in decisions] == [r.decision_id for r in results]

        def missing() -> list[dict]:
            return [d for d in decisions if not {d["span_id"]} <= {s.span_id for s in jaeger.trace(d["trace_id"])}]

        assert await wait_until_async(lambda: not missing(), timeout=60), f"{len(missing())} decisions not in Jaeger"
        for decision in decisions:
            spans = jaeger.trace(decision["trace_id"])
            (tool,) = [s for s in spans if s.span_id == decision["span_id"]]
            (guard,) = [s for s in spans if s.parent_span_id == decision["span_id"]]
            assert tool.tags["sidecar.evidence.seq"] == decision["seq"] and guard.name == "run_guardrail policy"

        received = jaeger.received()
        twice = {span_id: n for span_id, n in received.items() if n > 1}
        assert not twice, f"spans Jaeger received more than once: {twice}"
        for decision in decisions:
            assert received[decision["span_id"]] == 1
        # the outage was real: decisions made while Jaeger was down reached it after the restart
        assert stopped_at < started_at and results[stopped_at:started_at]
        assert "export works again" in caplog.text
        # the shipper's own warning: the health line quotes its last error ("span export failing (export failed)")
        assert caplog.text.count("evidence shipper: export failed") == 1, "one outage is reported once"


def test_a_span_delivered_twice_is_counted_twice(tmp_path, clean_otel_env):
    """The counting above can fail: the same span exported twice shows as 2, though storage keeps one."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    from sidecar.evidence.spans import ResourceCache, spans_for_record

    record = {
        "kind": "decision", "seq": 7, "tool": "echo", "tool_known": True, "outcome": "allow", "reasons": ["ok: x"],
        "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331",
        "time": "2026-11-29T10:00:00.000000Z", "logged_at": "2026-11-29T10:00:00.001000Z", "sidecar": "s",
    }
    with Jaeger(tmp_path / "jaeger", storage="badger", log_spans=True) as jaeger:
        spans = spans_for_record(record, ResourceCache(SERVICE))
        exporter = OTLPSpanExporter(endpoint=jaeger.otlp_grpc_endpoint, insecure=True, timeout=10)
        try:
            assert exporter.export(spans) is SpanExportResult.SUCCESS
            assert exporter.export(spans) is SpanExportResult.SUCCESS
        finally:
            exporter.shutdown()
        received = jaeger.received()
        assert received[record["span_id"]] == 2 and len(received) == 2
        assert [s.span_id for s in jaeger.trace(record["trace_id"])].count(record["span_id"]) == 1
