"""An escalated call, its approval and the approved retry come back from the real Jaeger as one trace."""

from __future__ import annotations

import pytest

from sidecar.client import AsyncClient
from sidecar.escalation.client import ApprovalsClient
from tests.doubles.escalation import ALICE, make_config
from tests.infra.jaeger import Jaeger, clean_otel_env, wait_until_async  # noqa: F401 (fixture)

SERVICE = "sidecar-escalation-test"


@pytest.fixture
def jaeger(tmp_path):
    with Jaeger(tmp_path / "jaeger") as running:
        yield running


async def test_escalation_approval_and_retry_are_one_trace_in_jaeger(tmp_path, running_sidecar, jaeger,
                                                                   clean_otel_env):
    sidecar = await running_sidecar(make_config(tmp_path, **jaeger.telemetry_settings(SERVICE)))
    address = sidecar.addresses[0]
    arguments = {"to": "cfo@example.com", "body": "hi"}
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        escalated = await agent.authorize("send_email", arguments)
        assert escalated.outcome == "escalate"
        await approvals.approve(escalated.escalation_id, approver=ALICE, note="ok")
        allowed = await agent.authorize("send_email", arguments, escalation_id=escalated.escalation_id)
    assert allowed.outcome == "allow"

    def whole_trace():
        spans = jaeger.trace(escalated.trace_id)
        kinds = sorted(s.tags.get("sidecar.evidence.kind", "") for s in spans)
        return spans if kinds == ["", "", "approval", "decision", "decision", "escalation"] else None

    spans = await wait_until_async(whole_trace)
    assert spans, f"incomplete trace in Jaeger: {sorted(s.name for s in jaeger.trace(escalated.trace_id))}"
    assert allowed.trace_id == escalated.trace_id, "the retry answers with the escalation's trace id"
    by_kind: dict[str, list] = {}
    for span in spans:
        by_kind.setdefault(span.tags.get("sidecar.evidence.kind", ""), []).append(span)
    (escalation,) = by_kind["escalation"]
    (approval,) = by_kind["approval"]
    first, retry = sorted(by_kind["decision"], key=lambda s: s.start_us)
    guards = by_kind[""]  # the run_guardrail child of each decision
    assert [first.tags["sidecar.decision.outcome"], retry.tags["sidecar.decision.outcome"]] == ["escalate", "allow"]
    assert first.tags["sidecar.decision.id"] == escalated.decision_id
    assert retry.tags["sidecar.decision.id"] == allowed.decision_id
    assert escalation.name == "sidecar.escalation" and approval.name == "sidecar.approval"
    assert escalation.parent_span_id == first.span_id
    # The approval record's parent is the escalation span, and it also links to it: Jaeger's
    # translation then shows that one reference as FOLLOWS_FROM, not CHILD_OF (tests/infra/jaeger.py Span).
    assert approval.references == (("FOLLOWS_FROM", escalated.trace_id, escalation.span_id),)
    assert retry.parent_span_id == escalation.span_id
    assert sorted(g.parent_span_id for g in guards) == sorted([first.span_id, retry.span_id])
    assert approval.tags["sidecar.approver"] == ALICE and retry.tags["sidecar.approver"] == ALICE
    assert escalation.tags["sidecar.escalation.id"] == escalated.escalation_id
    assert approval.tags["sidecar.escalation.state"] == "approved"
    # the search docs/evidence.md gives: the escalation id finds the trace
    assert set(jaeger.find(SERVICE, tags={"sidecar.escalation.id": escalated.escalation_id})) == {escalated.trace_id}
    # Jaeger's clock-skew check notes a child that ends after its parent (the escalation span
    # can outlast the decision span it hangs under); no other warning may show on the trace.
    warnings = [w for s in spans for w in s.warnings]
    assert all(w.startswith("clock skew adjustment disabled") for w in warnings), warnings
