"""The decision pipeline, composed in one place: check → identity → policy → evidence.

The gRPC servicer and the `check` CLI both call `Gate.authorize`; neither
knows how a stage works inside. Every path ends in a decision that is
recorded before it is returned, and every failure ends in a deny.
"""

from __future__ import annotations

import socket
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from sidecar.calls import CallIdRegistry, ToolCall, check_call
from sidecar.canonical import sha256_digest
from sidecar.evidence import DecisionEvent, EvidenceError, Receipt, Recorder, TraceContext
from sidecar.identity import CallerIdentity, IdentityError
from sidecar.policy.decision import Decision
from sidecar.policy.engine import PolicyEngine
from sidecar.policy.input import build_input
from sidecar.usage import UsageCounters


@dataclass(frozen=True)
class Verdict:
    """What the agent is told about its call."""

    decision: Decision
    decision_id: str
    call_id: str
    trace: TraceContext
    escalation_id: str = ""
    receipt: Receipt | None = None


def rfc3339_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Gate:
    def __init__(
        self,
        *,
        engine: PolicyEngine,
        usage: UsageCounters,
        call_ids: CallIdRegistry,
        recorder: Recorder | None,
        max_input_bytes: int,
        max_depth: int,
        instance_id: str,
    ):
        self.engine = engine
        self._usage = usage
        self._call_ids = call_ids
        self._recorder = recorder
        self._max_bytes = max_input_bytes
        self._max_depth = max_depth
        self.instance_id = instance_id

    async def authorize(
        self,
        call: ToolCall,
        identity: CallerIdentity | IdentityError,
        parent_trace: TraceContext | None = None,
        *,
        malformed: str | None = None,
    ) -> Verdict:
        """Decide one call. `malformed` is a reason the request could not be read at all."""
        started = time.perf_counter()
        decision_id = str(uuid.uuid4())
        call_id = call.call_id or str(uuid.uuid4())
        trace = TraceContext.new(parent_trace)
        now = rfc3339_now()

        problems, arguments_digest = check_call(call, max_bytes=self._max_bytes, max_depth=self._max_depth)
        if malformed:
            problems = [malformed]
        if isinstance(identity, IdentityError):
            problems.insert(0, f"unverified_caller: {identity.reason}")
        elif call.call_id and not problems:
            fingerprint = sha256_digest(f"{call.tool}\n{call.server}\n{arguments_digest}".encode())
            if not self._call_ids.claim(call.call_id, fingerprint):
                problems.append(
                    f"call_id_reused: call_id {call.call_id!r} was already used for a different tool call"
                )

        timings: dict[str, float] = {}
        if problems:
            decision = Decision.refused(problems, policy_revision=self.engine.revision)
        else:
            assert isinstance(identity, CallerIdentity)
            usage = self._usage.count(identity.subject.spiffe_id, call.tool, call.task_id)
            document = build_input(
                identity=identity,
                tool=call.tool,
                server=call.server,
                arguments=call.arguments,
                catalog_entry=self.engine.catalog_entry(call.tool),
                task_id=call.task_id,
                intent=call.intent,
                signals=call.signals or {},
                approval=None,
                usage=usage,
                call_id=call_id,
                time=now,
                sidecar=self.instance_id,
            )
            engine_started = time.perf_counter()
            decision = await self.engine.evaluate(document)
            timings["engine"] = (time.perf_counter() - engine_started) * 1000

        event = DecisionEvent(
            time=now,
            decision_id=decision_id,
            call_id=call_id,
            identity=identity if isinstance(identity, CallerIdentity) else None,
            tool=call.tool,
            server=call.server,
            arguments=call.arguments,
            arguments_digest=arguments_digest,
            task_id=call.task_id,
            intent=call.intent,
            signals=call.signals,
            outcome=decision.outcome,
            reasons=decision.reasons,
            obligations=decision.obligations,
            policy_revision=decision.policy_revision,
            engine=decision.engine,
            engine_error=decision.error,
            escalation_id=call.escalation_id,
            approver="",
            trace=trace,
            sidecar=self.instance_id,
            timings_ms=timings,
        )
        receipt = None
        if self._recorder is not None:
            evidence_started = time.perf_counter()
            try:
                receipt = await self._recorder.record(event)
            except EvidenceError as exc:
                decision = Decision.failed(
                    f"evidence_unavailable: the decision could not be recorded ({exc}); denied until evidence works",
                    engine=decision.engine,
                    policy_revision=decision.policy_revision,
                )
            timings["evidence"] = (time.perf_counter() - evidence_started) * 1000
        timings["total"] = (time.perf_counter() - started) * 1000
        return Verdict(decision, decision_id, call_id, trace, receipt=receipt)
