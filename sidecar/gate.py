"""The decision pipeline, composed in one place: check → identity → policy → evidence.

The gRPC servicer and the `check` CLI both call `Gate.authorize`; neither
knows how a stage works inside. Every path ends in a decision that is
recorded before it is returned, and every failure ends in a deny.
"""

from __future__ import annotations

import logging
import socket
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Protocol

from sidecar.calls import CallIdRegistry, ToolCall, check_call, normalized
from sidecar.canonical import sha256_digest
from sidecar.escalation import StoreError
from sidecar.evidence import DecisionEvent, EvidenceError, Receipt, Recorder, TraceContext
from sidecar.identity import CallerIdentity, IdentityError
from sidecar.jsonvalues import number_problems
from sidecar.metrics import Metrics
from sidecar.policy.decision import Decision, DecisionClient
from sidecar.policy.input import build_input
from sidecar.reasons import (
    APPROVAL_INSUFFICIENT,
    CALL_ID_REUSED,
    ESCALATION_UNAVAILABLE,
    ESCALATION_UNKNOWN,
    EVIDENCE_UNAVAILABLE,
    POLICY_MALFORMED,
    UNVERIFIED_CALLER,
    USAGE_UNAVAILABLE,
    Reason,
)
from sidecar.usage import UsageCounter, UsageUnavailable

if TYPE_CHECKING:
    from sidecar.escalation.service import EscalationService, RetryCheck
    from sidecar.overload import LoopLag
    from sidecar.policy.shadow import Shadow
    from sidecar.tasks import TaskRegistry

log = logging.getLogger(__name__)


class Catalog(Protocol):
    """The tool catalog of the policy serving now (sidecar/policy/catalog.py)."""

    def entry(self, tool: str) -> dict | None: ...

    @property
    def revision(self) -> str: ...


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


@dataclass
class _CallState:
    """One call on its way through `Gate.authorize`: what the stages learn and hand on."""

    call: ToolCall
    identity: CallerIdentity | IdentityError
    decision_id: str
    call_id: str
    trace: TraceContext
    now: str  # RFC 3339, the call's time for policy and evidence
    arguments_digest: str = ""
    problems: list[str] = field(default_factory=list)  # why the call may not go to policy
    retry: "RetryCheck | None" = None  # a call repeated with an escalation id
    catalog_entry: dict | None = None  # the entry policy decided with
    document: dict | None = None  # the input document, when policy was asked
    shadow_answer: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage


def rfc3339_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Gate:
    def __init__(
        self,
        *,
        decisions: DecisionClient,
        catalog: Catalog,
        usage: UsageCounter,
        call_ids: CallIdRegistry,
        recorder: Recorder | None,
        max_input_bytes: int,
        max_depth: int,
        instance_id: str,
        metrics: Metrics | None = None,
        escalations: "EscalationService | None" = None,
        shadow: "Shadow | None" = None,
        tasks: "TaskRegistry | None" = None,
        overload: "LoopLag | None" = None,
    ):
        self.decisions = decisions
        self.catalog = catalog
        self._usage = usage
        self._call_ids = call_ids
        self._recorder = recorder
        self._max_bytes = max_input_bytes
        self._max_depth = max_depth
        self.instance_id = instance_id
        self._metrics = metrics
        # Escalations (docs/escalation.md): None = escalate answers carry no escalation id.
        self.escalations = escalations
        # Shadow mode (sidecar/policy/shadow.py): a candidate bundle decides too, never enforced.
        self.shadow = shadow
        # Task lifetimes (EndTask, idle timeout): None = tasks never end.
        self._tasks = tasks
        # Front-door load shedding (sidecar/overload.py): None = calls are never shed.
        self._overload = overload

    async def authorize(
        self,
        call: ToolCall,
        identity: CallerIdentity | IdentityError,
        parent_trace: TraceContext | None = None,
        *,
        malformed: str | None = None,
    ) -> Verdict:
        """Decide one call. `malformed` is a reason the request could not be read at all.

        The stages, in order: admission (the call's own checks, identity, load shedding,
        call-id replay, task end, an escalation retry), usage, policy, escalation, evidence;
        then an escalation is announced only once the decision that raised it is recorded.
        """
        started = time.perf_counter()
        call = normalized(call)  # the numbers rule: policy, evidence and approvals see one value
        state = _CallState(
            call=call,
            identity=identity,
            decision_id=str(uuid.uuid4()),
            call_id=call.call_id or str(uuid.uuid4()),
            trace=TraceContext.new(parent_trace),
            now=rfc3339_now(),
        )
        problems, state.arguments_digest = check_call(call, max_bytes=self._max_bytes, max_depth=self._max_depth)
        state.problems = [malformed] if malformed else problems
        await self._admit(state)
        decision = await self._policy_stage(state)
        policy_decision = decision

        escalation_id, approver, new_escalation = call.escalation_id, "", None
        if not state.problems and self.escalations is not None:
            decision, escalation_id, approver, new_escalation = await self._escalation_step(decision, state)

        decision, receipt = await self._record(state, decision, policy_decision, escalation_id, approver)
        if new_escalation is not None and self.escalations is not None:
            if decision.outcome == "escalate":
                await self.escalations.announce(new_escalation, state.trace.span_id)
            else:  # the escalating decision could not be recorded: nobody may approve it
                await self.escalations.withdraw(new_escalation)
        state.timings["total"] = (time.perf_counter() - started) * 1000
        if self._metrics is not None:
            self._metrics.observe(decision.outcome, decision.engine, decision.error is not None, state.timings)
        return Verdict(
            decision,
            state.decision_id,
            state.call_id,
            state.trace,
            escalation_id=escalation_id if decision.outcome == "escalate" else "",
            receipt=receipt,
            approver=approver if decision.outcome == "allow" else "",
            arguments_digest=state.arguments_digest,
        )

    async def _admit(self, state: _CallState) -> None:
        """May the call go to policy? Adds to `state.problems` why not; sets the escalation retry."""
        call, identity, problems = state.call, state.identity, state.problems
        shed = self._overload.refusal() if self._overload is not None and not problems else None
        if isinstance(identity, IdentityError):
            problems.insert(0, str(Reason(UNVERIFIED_CALLER, identity.reason)))
            log.info("unverified caller denied (decision %s): %r", state.decision_id, identity.reason)
        elif shed:  # before the call id is claimed: the same call may be sent again once the load drops
            problems.append(shed)
        elif call.call_id and not problems:
            fingerprint = sha256_digest(f"{call.tool}\n{call.server}\n{state.arguments_digest}".encode())
            if not self._call_ids.claim(call.call_id, fingerprint):
                problems.append(str(Reason(
                    CALL_ID_REUSED, f"call_id {call.call_id!r} was already used for a different tool call"
                )))
        if call.task_id and not problems and self._tasks is not None and isinstance(identity, CallerIdentity):
            ended = await self._tasks.check(call.task_id, identity, state.trace)
            if ended:
                problems.append(ended)
        if call.escalation_id and not problems:
            state.retry, problem = await self._check_retry(call, identity, state.arguments_digest)
            if problem:
                problems.append(problem)
            if state.retry is not None and state.retry.parent is not None:
                state.trace = TraceContext.new(state.retry.parent)  # the retry joins the escalated call's trace

    async def _policy_stage(self, state: _CallState) -> Decision:
        """The decision: a refusal for an inadmissible call, else OPA's on the input document
        (and the shadow's beside it). Fails closed when the call cannot be counted."""
        if state.problems:
            return Decision.refused(state.problems, policy_revision=self.catalog.revision)
        call, identity = state.call, state.identity
        assert isinstance(identity, CallerIdentity)
        try:
            usage = await self._usage.count(identity.subject.spiffe_id, call.tool, call.task_id)
        except UsageUnavailable as exc:  # a stage failed: fail closed, like an engine or evidence failure
            return Decision.failed(
                str(Reason(USAGE_UNAVAILABLE, f"the call could not be counted for input.usage ({exc})")),
                engine="sidecar",
                policy_revision=self.catalog.revision,
            )
        state.catalog_entry = self.catalog.entry(call.tool)  # an escalation keeps it for approvers
        state.document = build_input(
            identity=identity,
            tool=call.tool,
            server=call.server,
            arguments=call.arguments,
            catalog_entry=state.catalog_entry,
            task_id=call.task_id,
            intent=call.intent,
            signals=call.signals or {},
            approval=state.retry.approval if state.retry is not None else None,
            usage=usage,
            call_id=state.call_id,
            time=state.now,
            sidecar=self.instance_id,
        )
        engine_started = time.perf_counter()
        pending_shadow = self.shadow.begin(state.document) if self.shadow is not None else None
        decision = await self.decisions.decide(state.document)
        state.timings["engine"] = (time.perf_counter() - engine_started) * 1000
        unexact = number_problems(decision.obligations, "obligations")
        if unexact:  # the agent would receive other obligations than the ones recorded
            decision = Decision.failed(
                str(Reason(POLICY_MALFORMED, f"{'; '.join(unexact)}; obligations must reach the agent exactly")),
                engine=decision.engine,
                policy_revision=decision.policy_revision,
            )
        if pending_shadow is not None and self.shadow is not None:
            state.shadow_answer = await self.shadow.finish(pending_shadow, decision)  # bounded by the shadow's budget
        return decision

    async def _record(
        self, state: _CallState, decision: Decision, policy_decision: Decision, escalation_id: str, approver: str
    ) -> tuple[Decision, Receipt | None]:
        """Record the decision; when that fails, the answer becomes a deny naming why."""
        if self._recorder is None:
            return decision, None
        call, identity, document = state.call, state.identity, state.document
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
            escalation_id=escalation_id,
            approver=approver,
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
        receipt = None
        try:
            receipt = await self._recorder.record(event)
        except EvidenceError as exc:
            decision = Decision.failed(
                str(Reason(
                    EVIDENCE_UNAVAILABLE, f"the decision could not be recorded ({exc}); denied until evidence works"
                )),
                engine=decision.engine,
                policy_revision=decision.policy_revision,
            )
        state.timings["evidence"] = (time.perf_counter() - evidence_started) * 1000
        return decision, receipt

    async def visible(self, identity: CallerIdentity, tool: str, server: str) -> Decision:
        """Would policy let this caller see `tool` of `server` (MCP tools/list)?

        Evaluates the input document with `request.phase: "list"`, arguments {}
        and the usage a call made now would see; nothing is counted or recorded
        (listing calls nothing).
        A tool is shown unless the decision is deny; failures deny (hidden).
        """
        try:
            usage = await self._usage.peek(identity.subject.spiffe_id, tool)
        except UsageUnavailable as exc:
            return Decision.failed(
                str(Reason(USAGE_UNAVAILABLE, str(exc))), engine="sidecar", policy_revision=self.catalog.revision
            )
        document = build_input(
            identity=identity,
            tool=tool,
            server=server,
            arguments={},
            catalog_entry=self.catalog.entry(tool),
            task_id="",
            intent="",
            signals={},
            approval=None,
            usage=usage,
            call_id=str(uuid.uuid4()),
            time=rfc3339_now(),
            sidecar=self.instance_id,
            phase="list",
        )
        return await self.decisions.decide(document)

    async def _check_retry(
        self, call: ToolCall, identity: CallerIdentity | IdentityError, arguments_digest: str
    ) -> tuple["RetryCheck | None", str | None]:
        """A call repeated with an escalation id: may it go to policy, and with which approval?"""
        if self.escalations is None:
            return None, str(Reason(
                ESCALATION_UNKNOWN, "this sidecar keeps no escalations, so no escalation id is valid here"
            ))
        if not isinstance(identity, CallerIdentity):
            return None, None
        shape = self.escalations.shape(identity, call.tool, call.server, arguments_digest, call.task_id)
        try:
            retry = await self.escalations.check_retry(call.escalation_id, shape)
        except StoreError as exc:
            return None, str(Reason(ESCALATION_UNAVAILABLE, f"the escalation store cannot be read ({exc})"))
        return retry, retry.refusal

    async def _escalation_step(self, decision: Decision, state: _CallState):
        """Returns (decision, escalation_id, approver, new escalation to announce or None).

        escalate → the call's escalation (the pending one for the same call, or a new one);
        an approved retry that policy allows → the approval is consumed, once.
        """
        service = self.escalations
        assert service is not None and isinstance(state.identity, CallerIdentity)
        call, identity, retry, trace = state.call, state.identity, state.retry, state.trace
        approval = retry.approval if retry is not None else None
        if approval is not None and retry is not None and retry.record is not None:
            if decision.outcome == "allow":
                try:
                    used, reason = await service.consume(retry.record, state.decision_id)
                except StoreError as exc:
                    used, reason = False, str(Reason(ESCALATION_UNAVAILABLE, f"the approval could not be used ({exc})"))
                if not used:
                    return Decision.refused([reason], policy_revision=decision.policy_revision), call.escalation_id, "", None
                return decision, retry.record.id, approval.approver, None
            if decision.outcome == "escalate":
                reasons = (
                    str(Reason(
                        APPROVAL_INSUFFICIENT,
                        f"policy still escalates this call with escalation {retry.record.id} "
                        f"approved by {approval.approver}; ask again without the escalation id",
                    )),
                    *decision.reasons,
                )
                return (
                    Decision("deny", reasons, decision.obligations, decision.policy_revision, decision.engine),
                    call.escalation_id,
                    approval.approver,
                    None,
                )
            return decision, call.escalation_id, approval.approver, None
        if decision.outcome != "escalate":
            return decision, call.escalation_id, "", None
        try:
            record, created = await service.escalate(
                identity=identity,
                call=call,
                arguments_digest=state.arguments_digest,
                reasons=decision.reasons,
                obligations=decision.obligations,
                policy_revision=decision.policy_revision,
                decision_id=state.decision_id,
                call_id=state.call_id,
                trace=trace,
                catalog_entry=state.catalog_entry,
            )
        except StoreError as exc:
            reason = str(Reason(
                ESCALATION_UNAVAILABLE, f"the call needs approval but the escalation store failed ({exc})"
            ))
            return Decision.refused([reason, *decision.reasons], policy_revision=decision.policy_revision), "", "", None
        return decision, record.id, "", record if created else None
