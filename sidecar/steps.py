"""The steps every tool call goes through, in the order `server.default_steps` lists them.

Each step is one object with one async method, `run(state)`, over the call's `CallState`,
and gets its collaborators through its constructor. `Admit` says why the call may not go to
policy (`state.problems`), `AskPolicy` decides, `Escalate` may replace the decision. The
Gate records the outcome after the last step (sidecar/gate.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Protocol

import orjson

from sidecar.calls import CallIdRegistry, check_call
from sidecar.canonical import sha256_digest
from sidecar.escalation import StoreError
from sidecar.evidence import TraceContext
from sidecar.gate import CallState, rfc3339_now
from sidecar.identity import CallerIdentity, IdentityError
from sidecar.jsonvalues import number_problems
from sidecar.policy.decision import Decision, DecisionClient
from sidecar.policy.input import build_input
from sidecar.reasons import (
    APPROVAL_INSUFFICIENT,
    CALL_ID_REUSED,
    ESCALATION_UNAVAILABLE,
    ESCALATION_UNKNOWN,
    POLICY_MALFORMED,
    UNVERIFIED_CALLER,
    USAGE_UNAVAILABLE,
    Reason,
)
from sidecar.usage import UsageCounter, UsageUnavailable

if TYPE_CHECKING:
    from sidecar.escalation.service import EscalationService
    from sidecar.overload import LoopLag
    from sidecar.policy.shadow import Shadow
    from sidecar.tasks import TaskRegistry

log = logging.getLogger("sidecar.gate")  # the logger name operators filter on and the log lines show


class Catalog(Protocol):
    """The tool catalog of the policy serving now (sidecar/policy/catalog.py)."""

    def entry(self, tool: str) -> dict | None: ...

    @property
    def revision(self) -> str: ...


class Admit:
    """May the call go to policy at all? Its own checks (size, depth, values), a verified caller,
    load shedding, call-id replay, an ended task and, for a call repeated with an escalation id,
    that escalation: each adds to `state.problems` why not.

    Sets `state.arguments_digest`, and for a repeated call `state.retry` (its approval reaches
    policy as input.approval) and the escalated call's trace. Shedding comes before the call id
    is claimed, so the same call may be sent again once the load drops.
    """

    def __init__(
        self,
        *,
        max_input_bytes: int,
        max_depth: int,
        call_ids: CallIdRegistry,
        overload: "LoopLag | None" = None,  # None = calls are never shed (sidecar/overload.py)
        tasks: "TaskRegistry | None" = None,  # None = tasks never end (EndTask, idle timeout)
        escalations: "EscalationService | None" = None,  # None = no escalation id is valid here
    ):
        self._max_bytes = max_input_bytes
        self._max_depth = max_depth
        self._call_ids = call_ids
        self._overload = overload
        self._tasks = tasks
        self._escalations = escalations

    async def run(self, state: CallState) -> None:
        call, identity = state.call, state.identity
        found, state.arguments_digest = check_call(call, max_bytes=self._max_bytes, max_depth=self._max_depth)
        if not state.problems:  # a request that could not be read at all keeps its one reason
            state.problems = found
        problems = state.problems
        shed = self._overload.refusal() if self._overload is not None and not problems else None
        if isinstance(identity, IdentityError):
            problems.insert(0, str(Reason(UNVERIFIED_CALLER, identity.reason)))
            log.info("unverified caller denied (decision %s): %r", state.decision_id, identity.reason)
        elif shed:
            problems.append(shed)
        elif call.call_id and not problems:
            # One id, one caller's call: the verified caller and its chain are part of the call, and so is
            # its task (as in the exact call an approval holds for, escalation/fingerprint.py).
            fingerprint = sha256_digest(orjson.dumps((
                call.tool, call.server, state.arguments_digest, call.task_id,
                identity.subject.spiffe_id, *(link.spiffe_id for link in identity.delegation),
            )))
            if not self._call_ids.claim(call.call_id, fingerprint):
                problems.append(str(Reason(
                    CALL_ID_REUSED, f"call_id {call.call_id!r} was already used for a different tool call"
                )))
        if call.task_id and not problems and self._tasks is not None and isinstance(identity, CallerIdentity):
            ended = await self._tasks.check(call.task_id, identity, state.trace)
            if ended:
                problems.append(ended)
        if call.escalation_id and not problems:
            await self._check_retry(state)

    async def _check_retry(self, state: CallState) -> None:
        """A call repeated with an escalation id: may it go to policy, and with which approval?"""
        call, identity = state.call, state.identity
        if self._escalations is None:
            state.problems.append(str(Reason(
                ESCALATION_UNKNOWN, "this sidecar keeps no escalations, so no escalation id is valid here"
            )))
            return
        if not isinstance(identity, CallerIdentity):
            return
        shape = self._escalations.shape(identity, call.tool, call.server, state.arguments_digest, call.task_id)
        try:
            retry = await self._escalations.check_retry(call.escalation_id, shape)
        except StoreError as exc:
            state.problems.append(str(Reason(ESCALATION_UNAVAILABLE, f"the escalation store cannot be read ({exc})")))
            return
        state.retry = retry
        if retry.refusal:
            state.problems.append(retry.refusal)
        if retry.parent is not None:
            state.trace = TraceContext.new(retry.parent)  # the retry joins the escalated call's trace


class AskPolicy:
    """The decision: a refusal for a call with problems, else OPA's on the input document (and
    the shadow's beside it). Fails closed when the call cannot be counted.

    Sets `state.decision` and `state.policy_decision`, and what evidence keeps of the question:
    the catalog entry, the input document, the shadow's answer. Also answers `visible`, the
    same question for a tool list, which counts and records nothing.
    """

    def __init__(
        self,
        *,
        decisions: DecisionClient,
        catalog: Catalog,
        usage: UsageCounter,
        instance_id: str,
        shadow: "Shadow | None" = None,
    ):
        self.decisions = decisions  # an attribute: `Gate.decisions` hands it out and takes a replacement
        self._catalog = catalog
        self._usage = usage
        self._instance_id = instance_id
        # Shadow mode (sidecar/policy/shadow.py): a candidate bundle decides too, never enforced.
        self.shadow = shadow

    async def run(self, state: CallState) -> None:
        if state.problems:
            state.decision = state.policy_decision = Decision.refused(
                state.problems, policy_revision=self._catalog.revision
            )
            return
        call, identity = state.call, state.identity
        assert isinstance(identity, CallerIdentity)
        try:
            usage = await self._usage.count(identity.subject.spiffe_id, call.tool, call.task_id)
        except UsageUnavailable as exc:  # a stage failed: fail closed, like an engine or evidence failure
            state.decision = state.policy_decision = Decision.failed(
                str(Reason(USAGE_UNAVAILABLE, f"the call could not be counted for input.usage ({exc})")),
                engine="sidecar",
                policy_revision=self._catalog.revision,
            )
            return
        state.catalog_entry = self._catalog.entry(call.tool)  # an escalation keeps it for approvers
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
            sidecar=self._instance_id,
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
        state.decision = state.policy_decision = decision

    async def visible(self, identity: CallerIdentity, tool: str, server: str) -> Decision:
        """Would policy let this caller see `tool` of `server`? (`Gate.visible`)"""
        try:
            usage = await self._usage.peek(identity.subject.spiffe_id, tool)
        except UsageUnavailable as exc:
            return Decision.failed(
                str(Reason(USAGE_UNAVAILABLE, str(exc))), engine="sidecar", policy_revision=self._catalog.revision
            )
        document = build_input(
            identity=identity,
            tool=tool,
            server=server,
            arguments={},
            catalog_entry=self._catalog.entry(tool),
            task_id="",
            intent="",
            signals={},
            approval=None,
            usage=usage,
            call_id=str(uuid.uuid4()),
            time=rfc3339_now(),
            sidecar=self._instance_id,
            phase="list",
        )
        return await self.decisions.decide(document)


class Escalate:
    """After policy, for a call that reached it: escalate → the call's escalation (the pending
    one for the same call, or a new one); an approved retry that policy allows → the approval
    is consumed, once.

    Sets `state.escalation_id` and `state.approver`, may replace `state.decision` with a deny,
    and leaves a new escalation in `state.new_escalation` for the Gate to announce once the
    decision that raised it is recorded (an approval it used in `state.used_approval`, for the
    Gate to give back when the allow could not be recorded).
    """

    def __init__(self, escalations: "EscalationService"):
        self._escalations = escalations

    async def run(self, state: CallState) -> None:
        if state.problems:  # refused before policy: nothing to escalate or consume
            return
        decision = state.decision
        assert decision is not None and isinstance(state.identity, CallerIdentity)
        call, retry = state.call, state.retry
        approval = retry.approval if retry is not None else None
        if approval is not None and retry is not None and retry.record is not None:
            if decision.outcome == "allow":
                try:
                    used, reason = await self._escalations.consume(retry.record, state.decision_id)
                except StoreError as exc:
                    used, reason = False, str(Reason(ESCALATION_UNAVAILABLE, f"the approval could not be used ({exc})"))
                if not used:
                    state.decision = Decision.refused([reason], policy_revision=decision.policy_revision)
                    return
                state.escalation_id = retry.record.id
                state.approver = approval.approver
                state.used_approval = retry.record
                return
            state.approver = approval.approver
            if decision.outcome == "escalate":
                reasons = (
                    str(Reason(
                        APPROVAL_INSUFFICIENT,
                        f"policy still escalates this call with escalation {retry.record.id} "
                        f"approved by {approval.approver}; ask again without the escalation id",
                    )),
                    *decision.reasons,
                )
                state.decision = Decision(
                    "deny", reasons, decision.obligations, decision.policy_revision, decision.engine
                )
            return
        if decision.outcome != "escalate":
            return
        try:
            record, created = await self._escalations.escalate(
                identity=state.identity,
                call=call,
                arguments_digest=state.arguments_digest,
                reasons=decision.reasons,
                obligations=decision.obligations,
                policy_revision=decision.policy_revision,
                decision_id=state.decision_id,
                call_id=state.call_id,
                trace=state.trace,
                catalog_entry=state.catalog_entry,
            )
        except StoreError as exc:
            reason = str(Reason(
                ESCALATION_UNAVAILABLE, f"the call needs approval but the escalation store failed ({exc})"
            ))
            state.decision = Decision.refused([reason, *decision.reasons], policy_revision=decision.policy_revision)
            state.escalation_id = ""
            return
        state.escalation_id = record.id
        if created:
            state.new_escalation = record
