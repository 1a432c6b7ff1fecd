"""The Gate's steps: listed in order in one place, run in that order, then record → announce or withdraw."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sidecar.calls import CallIdRegistry, ToolCall
from sidecar.escalation import StoreError
from sidecar.evidence import EvidenceError, Receipt
from sidecar.gate import Gate
from sidecar.identity import CallerIdentity, Subject
from sidecar.policy.decision import Decision
from sidecar.server import default_steps
from sidecar.steps import Admit, AskPolicy, Escalate
from sidecar.usage.memory import MemoryCounter

CALLER = CallerIdentity(Subject("spiffe://dev.local/agent", source="dev"))


class Escalating:
    """DecisionClient and Catalog: every call escalates."""

    revision = "rev-1"

    def entry(self, tool):
        return None

    async def decide(self, document):
        return Decision("escalate", ("needs_approval: test",), {}, "rev-1", "fake")


class Journal:
    """A recorder and an escalation service that write down what was asked of them, in order.

    Stand-ins: these tests read the order of the Gate's calls, which the real stages do not
    report; the real recorder and service are exercised through running sidecars
    (test_escalation_flow.py, test_evidence_*.py)."""

    def __init__(self, *, evidence_fails: bool = False, store_fails: bool = False):
        self.said: list[str] = []
        self._evidence_fails = evidence_fails
        self._store_fails = store_fails

    async def record(self, event, *, followed_by=()):
        then = "".join(f" + {kind} {fields['escalation_id']}" for kind, fields in followed_by)
        self.said.append(f"record {event.outcome} {event.escalation_id or '-'}{then}")
        if self._evidence_fails:
            raise EvidenceError("disk full")
        return Receipt(1, "sha256:0")

    async def escalate(self, **fields):
        self.said.append("escalate")
        if self._store_fails:
            raise StoreError("store down")
        return SimpleNamespace(id="esc-1"), True

    def escalation_record(self, record, decision_span_id):
        return "escalation", {"escalation_id": record.id}

    def announce(self, record):
        self.said.append(f"announce {record.id}")

    async def withdraw(self, record):
        self.said.append(f"withdraw {record.id}")


def gate_over(journal: Journal) -> Gate:
    ask = AskPolicy(decisions=Escalating(), catalog=Escalating(), usage=MemoryCounter(60, 100), instance_id="t")
    steps = default_steps(
        policy=ask, call_ids=CallIdRegistry(100), max_input_bytes=1 << 20, max_depth=64, escalations=journal
    )
    return Gate(steps=steps, policy=ask, recorder=journal, instance_id="t", escalations=journal)


def test_default_steps_are_listed_in_the_order_they_run():
    ask = AskPolicy(decisions=Escalating(), catalog=Escalating(), usage=MemoryCounter(60, 100), instance_id="t")
    common = dict(policy=ask, call_ids=CallIdRegistry(100), max_input_bytes=1 << 20, max_depth=64)
    assert [type(s) for s in default_steps(**common)] == [Admit, AskPolicy]
    with_escalations = default_steps(**common, escalations=Journal())
    assert [type(s) for s in with_escalations] == [Admit, AskPolicy, Escalate]
    with pytest.raises(ValueError, match="policy step"):
        Gate(steps=with_escalations[:1], policy=ask, recorder=None, instance_id="t")


async def test_an_escalation_is_recorded_with_its_decision_and_announced_only_after():
    journal = Journal()
    verdict = await gate_over(journal).authorize(ToolCall("send_email", {}), CALLER)
    assert (verdict.decision.outcome, verdict.escalation_id) == ("escalate", "esc-1")
    assert journal.said == ["escalate", "record escalate esc-1 + escalation esc-1", "announce esc-1"]


async def test_an_escalation_whose_decision_cannot_be_recorded_is_withdrawn():
    journal = Journal(evidence_fails=True)
    verdict = await gate_over(journal).authorize(ToolCall("send_email", {}), CALLER)
    assert verdict.decision.outcome == "deny" and verdict.escalation_id == ""
    assert verdict.decision.reasons[0].startswith("evidence_unavailable: ")
    assert journal.said == ["escalate", "record escalate esc-1 + escalation esc-1", "withdraw esc-1"]


async def test_a_failed_escalation_store_denies_and_names_no_escalation():
    journal = Journal(store_fails=True)
    verdict = await gate_over(journal).authorize(ToolCall("send_email", {}), CALLER)
    assert verdict.decision.outcome == "deny" and verdict.escalation_id == ""
    assert verdict.decision.reasons == (
        "escalation_unavailable: the call needs approval but the escalation store failed (store down)",
        "needs_approval: test",
    )
    assert journal.said == ["escalate", "record deny -"]
