"""Spans from evidence records, shipped losslessly to an OTLP receiver (test double) that fails, slows and dies.

OTLP over HTTP, and the sidecar's spans in the real Jaeger, are in tests/test_jaeger_*.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.evidence import TraceContext
from sidecar.evidence.recorder import open_recorder
from sidecar.evidence.spans import exporter_from_env
from sidecar.evidence.verify import verify_dir
from tests.doubles.otlp_receiver import OtlpReceiver
from tests.infra.jaeger import wait_until_async
from tests.test_evidence_log import AGENT, OUTCOMES, make_event


def shipping_to(receiver: OtlpReceiver, timeout_seconds: float = 1.0) -> dict:
    """open_recorder's span-export arguments for the receiver, as server.build_recorder builds them."""
    return {
        "exporter": exporter_from_env(endpoint=receiver.endpoint, timeout_seconds=timeout_seconds),
        "max_backoff_seconds": 0.3,
    }


@pytest.fixture
def receiver():
    rx = OtlpReceiver().start()
    yield rx
    rx.stop()


@pytest.fixture
def clean_otel_env(monkeypatch):
    for name in ("OTEL_SERVICE_NAME", "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_RESOURCE_ATTRIBUTES",
                 "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


async def test_each_decision_is_an_execute_tool_span_with_a_guardrail_child(tmp_path, receiver, clean_otel_env, monkeypatch):
    monkeypatch.setenv("POD_NAME", "agent-7f9c")
    monkeypatch.setenv("POD_NAMESPACE", "agents")
    rec = open_recorder(
        tmp_path / "ev", **shipping_to(receiver), instance_id="sidecar-test-1",
        known_tool=lambda t: t == "read_file",
    )
    events, receipts = {}, {}
    try:
        parent = TraceContext.new()
        for i, case in enumerate(sorted(OUTCOMES)):
            trace = TraceContext.new(parent) if case == "allow" else TraceContext.new()
            events[case] = make_event(i, trace=trace, **OUTCOMES[case])
            receipts[case] = await rec.record(events[case])
        events["unknown_tool"] = make_event(9, tool="rm_rf_everything")
        receipts["unknown_tool"] = await rec.record(events["unknown_tool"])
        assert receiver.wait_for(lambda r: len(r.by_name("execute_tool")) == len(events) and len(r.by_name("run_guardrail")) == len(events))
    finally:
        await rec.aclose()

    spans = {s.span_id: s for s in receiver.spans}
    for case, event in events.items():
        span = spans[event.trace.span_id]
        receipt = receipts[case]
        assert span.trace_id == event.trace.trace_id
        assert span.parent_span_id == (event.trace.parent_span_id or "")
        assert span.name == ("execute_tool" if case == "unknown_tool" else "execute_tool read_file")
        a = span.attributes
        assert a["gen_ai.operation.name"] == "execute_tool"
        assert a["gen_ai.tool.name"] == event.tool and a["gen_ai.tool.call.id"] == event.call_id
        assert a["spiffe.id"] == ("" if event.identity is None else AGENT)
        assert a["sidecar.subject.source"] == ("" if event.identity is None else "workload_api")
        assert a["sidecar.decision.id"] == event.decision_id and a["sidecar.policy.revision"] == "rev-42"
        assert a["sidecar.evidence.seq"] == receipt.seq and a["sidecar.evidence.hash"] == receipt.hash
        assert a["sidecar.decision.outcome"] == event.outcome
        assert a["sidecar.decision.reason_codes"] == [r.split(": ")[0] for r in event.reasons]
        assert [e[1]["sidecar.reason.text"] for e in span.events] == list(event.reasons)
        # a deny is not an error; an engine failure is
        assert span.status_code == (2 if event.engine_error else 0), case
        assert span.resource["service.name"] == "agent-sidecar"
        assert span.resource["service.instance.id"] == "sidecar-test-1"
        assert span.resource["k8s.pod.name"] == "agent-7f9c" and span.resource["k8s.namespace.name"] == "agents"

        (guard,) = [s for s in receiver.spans if s.parent_span_id == event.trace.span_id]
        assert guard.name == "run_guardrail policy" and guard.trace_id == event.trace.trace_id
        g = guard.attributes
        assert g["gen_ai.guardrail.verdict.type"] == event.outcome
        assert g["gen_ai.guardrail.target.subtype"] == "tool_call" and g["gen_ai.guardrail.target.id"] == event.call_id
        assert g["gen_ai.guardrail.security.content.input.hash"] == event.arguments_digest
        assert g["gen_ai.guardrail.verdict.reason"] == event.reasons[0].split(": ")[0]
    assert receiver.by_name("evidence.checkpoint"), "the closing checkpoint goes to the collector too"


async def test_service_name_from_config_or_env(tmp_path, receiver, clean_otel_env, monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    rec = open_recorder(tmp_path / "ev", **shipping_to(receiver), instance_id="s")
    try:
        await rec.record(make_event(1))
        assert receiver.wait_for(lambda r: r.by_name("execute_tool"))
    finally:
        await rec.aclose()
    span = receiver.by_name("execute_tool")[0]
    assert span.resource["service.name"] == "from-env"
    assert span.resource["deployment.environment"] == "test"


async def test_a_collector_down_for_a_while_receives_every_span_when_back(tmp_path, receiver, clean_otel_env):
    rec = open_recorder(tmp_path / "ev", **shipping_to(receiver), instance_id="s")
    try:
        await rec.record(make_event(0))
        assert receiver.wait_for(lambda r: r.by_name("execute_tool"))
        receiver.stop()
        started = time.monotonic()
        events = [make_event(i) for i in range(1, 301)]
        await asyncio.gather(*(rec.record(e) for e in events))
        assert time.monotonic() - started < 5, "decisions waited for the collector"
        deadline = time.monotonic() + 15  # the exporter's own retries come first
        while rec.shipper.failures == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert rec.shipper.failures > 0 and rec.shipper.lag() > 0
        assert rec.health()[0], "a collector outage does not make the sidecar unhealthy"
        receiver.mode = "fail"  # comes back refusing (UNAVAILABLE) for a while
        receiver.start()
        assert await asyncio.to_thread(receiver.wait_for, lambda r: r.refused > 0, 15)
        receiver.mode = "ok"
        assert receiver.wait_for(lambda r: {e.trace.span_id for e in events} <= r.span_ids(), timeout=15)
    finally:
        await rec.aclose()
    received = {s.span_id: s for s in receiver.by_name("execute_tool")}
    for event in events:
        assert received[event.trace.span_id].trace_id == event.trace.trace_id
    assert receiver.refused > 0


async def test_spans_not_acknowledged_before_shutdown_are_shipped_by_the_next_start(tmp_path, receiver, clean_otel_env):
    directory = tmp_path / "ev"
    receiver.mode = "fail"
    rec = open_recorder(directory, **shipping_to(receiver), instance_id="one")
    events = [make_event(i, sidecar="one") for i in range(20)]
    try:
        for event in events:
            await rec.record(event)
    finally:
        await rec.aclose()
    assert not receiver.spans
    receiver.mode = "ok"
    rec = open_recorder(directory, **shipping_to(receiver), instance_id="two")
    try:
        assert receiver.wait_for(lambda r: {e.trace.span_id for e in events} <= r.span_ids())
    finally:
        await rec.aclose()
    by_id = {s.span_id: s for s in receiver.spans}
    # shipped after the restart, the spans keep the instance that decided them
    assert by_id[events[0].trace.span_id].resource["service.instance.id"] == "one"
    assert verify_dir(directory).ok


async def test_force_flush_waits_while_the_collector_answers_and_gives_up_at_once_in_an_outage(
    tmp_path, receiver, clean_otel_env
):
    """The shipper's OTel verbs: force_flush returns True once what is durable is acknowledged, and
    False at once while export fails (a shutdown is never held up by an outage); the recorder's
    `async with` then flushes (bounded) and shuts the shipper down."""
    async with open_recorder(tmp_path / "ev", **shipping_to(receiver), instance_id="s") as rec:
        await rec.record(make_event(0))
        assert await wait_until_async(lambda: rec.shipper.exported_spans > 0), "nothing was shipped"
        await rec.record(make_event(1))
        assert await asyncio.to_thread(rec.shipper.force_flush, 10_000)
        assert rec.shipper.lag() == 0 and len(receiver.by_name("execute_tool")) == 2
        receiver.mode = "fail"
        await rec.record(make_event(2))
        assert await wait_until_async(lambda: rec.shipper.last_error, timeout=15), "the outage went unnoticed"
        started = time.monotonic()
        assert not await asyncio.to_thread(rec.shipper.force_flush, 10_000)
        assert time.monotonic() - started < 1.0
    assert rec.health() == (False, "evidence log closed")


async def test_a_slow_collector_does_not_slow_decisions(tmp_path, receiver, clean_otel_env):
    receiver.delay = 5.0  # an export takes 5 s: decisions that waited for it could not finish in 3
    rec = open_recorder(tmp_path / "ev", **shipping_to(receiver, timeout_seconds=10.0), instance_id="s")
    try:
        await rec.record(make_event(0))
        # the shipper is now inside a slow export (the receiver counts it before its delay): waited for, not 0.1 s
        assert await asyncio.to_thread(receiver.wait_for, lambda r: r.requests >= 1)
        started = time.monotonic()
        for i in range(1, 21):
            await rec.record(make_event(i))
        assert time.monotonic() - started < 3.0  # 20 fsync'd records on a loaded disk, not one 5 s export
    finally:
        receiver.delay = 0
        await rec.aclose()


def test_exporter_choice_follows_config_and_otel_env(clean_otel_env):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    assert isinstance(exporter_from_env(environ={}), GrpcExporter)
    assert isinstance(exporter_from_env(environ={"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}), HttpExporter)
    assert isinstance(exporter_from_env(protocol="http/protobuf", environ={}), HttpExporter)
    assert exporter_from_env(environ={"OTEL_TRACES_EXPORTER": "none"}) is None
    assert exporter_from_env(environ={"OTEL_SDK_DISABLED": "true"}) is None
    assert exporter_from_env(exporter="none", environ={}) is None


async def test_escalation_kinds_become_spans_in_the_calls_trace_with_links(tmp_path, receiver, clean_otel_env):
    rec = open_recorder(tmp_path / "ev", **shipping_to(receiver), instance_id="s")
    decision = make_event(1, outcome="escalate", reasons=("needs_approval: outside address",), escalation_id="esc-1")
    approval_span = TraceContext.new(decision.trace)
    try:
        await rec.record(decision)
        await rec.append(
            "approval",
            {
                "time": "2026-11-22T10:00:05.000000Z",
                "escalation_id": "esc-1",
                "decision_id": decision.decision_id,
                "call_id": decision.call_id,
                "tool": "read_file",
                "subject": {"spiffe_id": AGENT, "source": "workload_api"},
                "outcome": "approved",
                "reasons": ["approved: by alice"],
                "approver": "alice",
                "state": "approved",
                "trace_id": approval_span.trace_id,
                "span_id": approval_span.span_id,
                "parent_span_id": decision.trace.span_id,
                "links": [{"trace_id": decision.trace.trace_id, "span_id": decision.trace.span_id, "type": "escalation"}],
                "sidecar": "s",
            },
        )
        assert receiver.wait_for(lambda r: r.by_name("sidecar.approval"))
    finally:
        await rec.aclose()
    (span,) = receiver.by_name("sidecar.approval")
    assert span.trace_id == decision.trace.trace_id and span.parent_span_id == decision.trace.span_id
    assert span.attributes["sidecar.approver"] == "alice" and span.attributes["sidecar.escalation.id"] == "esc-1"
    assert span.attributes["sidecar.escalation.state"] == "approved"
    assert "gen_ai.operation.name" not in span.attributes
