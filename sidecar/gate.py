"""The decision pipeline: the Gate runs every call through its steps, then records it.

The gRPC servicer, the MCP gateway and the `check` CLI call `Gate.authorize`; none
knows how a step works inside. The steps (sidecar/steps.py) are listed in the order
they run in one place, `server.default_steps`. Every path ends in a decision that is
recorded before it is returned, and every failure ends in a deny.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Protocol, Sequence

from sidecar.calls import ToolCall, normalized
from sidecar.concurrency import RunToEnd
from sidecar.evidence import DecisionEvent, EvidenceError, Receipt, Recorder, TraceContext
from sidecar.identity import CallerIdentity, IdentityError
from sidecar.metrics import Metrics
from sidecar.policy.decision import Decision, DecisionClient
from sidecar.reasons import EVIDENCE_UNAVAILABLE, Reason

if TYPE_CHECKING:
    from sidecar.escalation import EscalationRecord
    from sidecar.escalation.service import EscalationService, RetryCheck
    from sidecar.policy.shadow import Shadow
    from sidecar.steps import AskPolicy


@dataclass(frozen=True)
class Verdict:
    """What the agent is told about its call."""

    decision: Decision
    decision_id: str
    call_id: str
    trace: TraceContext
    escalation_id: str = ""
    receipt: Receipt | None = None
    approver: str = ""  # who approved the escalation this allow carries out ("" = autonomous)
    arguments_digest: str = ""  # of the arguments exactly as decided


@dataclass(slots=True)
class CallState:
    """One call on its way through the steps: what they learn and hand on, then what the Gate records."""

    call: ToolCall
    identity: CallerIdentity | IdentityError
    decision_id: str
    call_id: str
    trace: TraceContext
    now: str  # RFC 3339, the call's time for policy and evidence
    problems: list[str]  # why the call may not go to policy
    escalation_id: str  # the escalation the answer names: the call's own unless a step sets another
    arguments_digest: str = ""
    retry: "RetryCheck | None" = None  # a call repeated with an escalation id
    catalog_entry: dict | None = None  # the entry policy decided with
    document: dict | None = None  # the input document, when policy was asked
    shadow_answer: dict | None = None
    decision: Decision | None = None  # the answer: set by the policy step, a later step may replace it
    policy_decision: Decision | None = None  # what policy itself said, recorded when the answer differs
    approver: str = ""  # who approved the escalation this call carries out
    new_escalation: "EscalationRecord | None" = None  # raised by this call: announced once recorded
    used_approval: "EscalationRecord | None" = None  # used by this call: given back when its allow is not recorded
    receipt: Receipt | None = None  # of the decision's evidence record
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage


class Step(Protocol):
    """One step of every call (sidecar/steps.py); `server.default_steps` lists them in order."""

    async def run(self, state: CallState) -> None: ...


def rfc3339_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Gate:
    """Runs each call through `steps` in order, then records the decision, then announces or
    withdraws the escalation it raised. `policy` is the policy step among `steps`; it also
    answers `visible`."""

    def __init__(
        self,
        *,
        steps: Sequence[Step],
        policy: "AskPolicy",
        recorder: Recorder | None,
        instance_id: str,
        escalations: "EscalationService | None" = None,
        metrics: Metrics | None = None,
    ):
        if policy not in steps:
            raise ValueError("the policy step must be one of the gate's steps")
        self._steps = tuple(steps)
        self._policy = policy
        self._recorder = recorder
        self.instance_id = instance_id
        # Escalations (docs/escalation.md): one a call raised is announced, or withdrawn, once its decision is recorded.
        self.escalations = escalations
        self._metrics = metrics
        self._to_the_end = RunToEnd()

    @property
    def decisions(self) -> DecisionClient:
        """The client policy decides with; assignable, so a test can watch what OPA is asked."""
        return self._policy.decisions

    @decisions.setter
    def decisions(self, client: DecisionClient) -> None:
        self._policy.decisions = client

    @property
    def shadow(self) -> "Shadow | None":
        """The candidate bundle deciding beside policy (its health is served), or None."""
        return self._policy.shadow

    async def authorize(
        self,
        call: ToolCall,
        identity: CallerIdentity | IdentityError,
        parent_trace: TraceContext | None = None,
        *,
        malformed: str | None = None,
    ) -> Verdict:
        """Decide one call. `malformed` is a reason the request could not be read at all.

        The steps run in order; then the decision is recorded, and an escalation is announced
        only once the decision that raised it is recorded (withdrawn when it could not be); an
        approval the call used is given back when its allow could not be recorded.
        A caller that goes away (a gRPC deadline or cancel, an MCP client's cancellation) stops
        only its own wait: the decision runs to its end, so nothing a step began (an escalation
        in the store, an approval used) is left without its records.
        """
        return await self._to_the_end(self._authorize(call, identity, parent_trace, malformed))

    async def _authorize(
        self,
        call: ToolCall,
        identity: CallerIdentity | IdentityError,
        parent_trace: TraceContext | None,
        malformed: str | None,
    ) -> Verdict:
        started = time.perf_counter()
        call = normalized(call)  # the numbers rule: policy, evidence and approvals see one value
        state = CallState(
            call=call,
            identity=identity,
            decision_id=str(uuid.uuid4()),
            call_id=call.call_id or str(uuid.uuid4()),
            trace=TraceContext.new(parent_trace),
            now=rfc3339_now(),
            problems=[malformed] if malformed else [],
            escalation_id=call.escalation_id,
        )
        for step in self._steps:
            await step.run(state)
        await self._record(state)
        decision = state.decision
        assert decision is not None  # the policy step always decides
        if state.new_escalation is not None and self.escalations is not None:
            if decision.outcome == "escalate":
                self.escalations.announce(state.new_escalation)
            else:  # the escalating decision could not be recorded: nobody may approve it
                await self.escalations.withdraw(state.new_escalation)
        if state.used_approval is not None and self.escalations is not None and decision.outcome != "allow":
            # the allow that used it could not be recorded: the call does not run, and its approval holds
            await self.escalations.release(state.used_approval, state.decision_id)
        state.timings["total"] = (time.perf_counter() - started) * 1000
        if self._metrics is not None:
            self._metrics.observe(decision.outcome, decision.engine, decision.error is not None, state.timings)
        return Verdict(
            decision,
            state.decision_id,
            state.call_id,
            state.trace,
            escalation_id=state.escalation_id if decision.outcome == "escalate" else "",
            receipt=state.receipt,
            approver=state.approver if decision.outcome == "allow" else "",
            arguments_digest=state.arguments_digest,
        )

    async def _record(self, state: CallState) -> None:
        """Record the decision (sets `state.receipt`); when that fails, the answer becomes a deny naming why.

        A new escalation's own record is written in one unit with the decision that raised it:
        both are durable before anyone hears of the escalation, or neither is written."""
        if self._recorder is None:
            return
        call, identity, document = state.call, state.identity, state.document
        decision, policy_decision = state.decision, state.policy_decision
        assert decision is not None and policy_decision is not None
        event = DecisionEvent(
            time=state.now,
            decision_id=state.decision_id,
            call_id=state.call_id,
            identity=identity if isinstance(identity, CallerIdentity) else None,
            tool=call.tool,
            server=call.server,
            arguments=call.arguments,
            arguments_digest=state.arguments_digest,
            task_id=call.task_id,
            intent=call.intent,
            signals=call.signals,
            outcome=decision.outcome,
            reasons=decision.reasons,
            obligations=decision.obligations,
            policy_revision=decision.policy_revision,
            engine=decision.engine,
            engine_error=decision.error,
            engine_decision_id=decision.engine_decision_id,
            escalation_id=state.escalation_id,
            approver=state.approver,
            trace=state.trace,
            sidecar=self.instance_id,
            timings_ms=state.timings,
            input_document=document,
            policy_decision=(
                {"outcome": policy_decision.outcome, "reasons": list(policy_decision.reasons)}
                if document is not None
                and (policy_decision.outcome, policy_decision.reasons) != (decision.outcome, decision.reasons)
                else None
            ),
            shadow=state.shadow_answer,
        )
        evidence_started = time.perf_counter()
        try:
            state.receipt = await self._recorder.record(event, followed_by=self._escalation_record(state))
        except EvidenceError as exc:
            state.decision = Decision.failed(
                str(Reason(
                    EVIDENCE_UNAVAILABLE, f"the decision could not be recorded ({exc}); denied until evidence works"
                )),
                engine=decision.engine,
                policy_revision=decision.policy_revision,
            )
        state.timings["evidence"] = (time.perf_counter() - evidence_started) * 1000

    def _escalation_record(self, state: CallState) -> tuple[tuple[str, dict], ...]:
        """The evidence record of the escalation this call raised, if it raised one."""
        raised, decision = state.new_escalation, state.decision
        if raised is None or self.escalations is None or decision is None or decision.outcome != "escalate":
            return ()
        return (self.escalations.escalation_record(raised, state.trace.span_id),)

    async def visible(self, identity: CallerIdentity, tool: str, server: str) -> Decision:
        """Would policy let this caller see `tool` of `server` (MCP tools/list)?

        Evaluates the input document with `request.phase: "list"`, arguments {}
        and the usage a call made now would see; nothing is counted or recorded
        (listing calls nothing).
        A tool is shown unless the decision is deny; failures deny (hidden).
        """
        return await self._policy.visible(identity, tool, server)
