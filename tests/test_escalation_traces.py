"""The escalated call, its approval and the approved retry are one trace, as the collector receives it.

The sidecar ships its evidence records as OTLP spans to an in-process OTLP
receiver (tests/doubles/otlp_receiver.py; no collector can be installed here).
"""

from __future__ import annotations

import pytest

from sidecar.client import AsyncClient
from sidecar.escalation.client import ApprovalsClient
from tests.doubles.escalation import ALICE, make_config
from tests.doubles.otlp_receiver import OtlpReceiver


@pytest.fixture
def receiver(monkeypatch):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    rx = OtlpReceiver().start()
    yield rx
    rx.stop()


async def test_one_trace_from_escalation_to_approved_retry(tmp_path, running_sidecar, receiver):
    sidecar = await running_sidecar(make_config(tmp_path, **{
        "telemetry.exporter": "otlp", "telemetry.endpoint": receiver.endpoint,
        "telemetry.export_timeout_seconds": 2.0, "telemetry.max_backoff_seconds": 0.3,
    }))
    address = sidecar.addresses[0]
    arguments = {"to": "cfo@example.com", "body": "hi"}
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        escalated = await agent.authorize("send_email", arguments)
        await approvals.approve(escalated.escalation_id, approver=ALICE, note="ok")
        allowed = await agent.authorize("send_email", arguments, escalation_id=escalated.escalation_id)
    assert allowed.outcome == "allow"

    def complete(r: OtlpReceiver) -> bool:
        return bool(r.by_name("sidecar.approval")) and len(
            [s for s in r.by_name("execute_tool") if s.trace_id == escalated.trace_id]) == 2

    assert receiver.wait_for(complete, timeout=15)
    trace = [s for s in receiver.spans if s.trace_id == escalated.trace_id]
    by_kind = {}
    for span in trace:
        by_kind.setdefault(span.attributes.get("sidecar.evidence.kind"), []).append(span)
    (escalation,) = by_kind["escalation"]
    (approval,) = by_kind["approval"]
    decisions = sorted(by_kind["decision"], key=lambda s: s.start_time_unix_nano)
    assert [d.attributes["sidecar.decision.outcome"] for d in decisions] == ["escalate", "allow"]
    assert escalation.parent_span_id == decisions[0].span_id
    assert approval.parent_span_id == escalation.span_id
    assert decisions[1].parent_span_id == escalation.span_id
    assert approval.attributes["sidecar.approver"] == ALICE
    assert escalation.attributes["sidecar.escalation.id"] == escalated.escalation_id
    assert decisions[1].attributes["sidecar.approver"] == ALICE
