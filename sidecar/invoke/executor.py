"""Carry out an allowed call: obligations → credential + upstream call → `invocation` record.

    executor = Executor(sink=recorder, instance_id=...)
    performed = await executor.perform(call, identity, verdict, invoker)
    performed.result      InvocationResult (status ok | tool_error | failed | not_called)
    performed.receipt     where the invocation record landed (None: it could not be recorded)

The call is made with its arguments as the Gate decided on them (the numbers
rule of sidecar/jsonvalues.py applied, as `Gate.authorize` applies it), then
the obligations. Only an `allow` verdict whose decision was recorded is carried out; anything
else raises ValueError (a front door bug, never an upstream call). One
`invocation` record per allowed call, also when the sidecar refused to make
it (not_called) or it failed; its span is a child of the decision's span.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from sidecar.calls import ToolCall
from sidecar.canonical import NotCanonicalizable, canonical_json, sha256_digest
from sidecar.concurrency import RunToEnd
from sidecar.evidence import EvidenceError, EvidenceSink, Receipt
from sidecar.gate import Verdict, rfc3339_now
from sidecar.identity import CallerIdentity
from sidecar.invoke import NOT_CALLED, InvocationResult, ToolInvoker
from sidecar.invoke.obligations import ObligationError, apply_obligations
from sidecar.jsonvalues import normalize
from sidecar.reasons import EVIDENCE_UNAVAILABLE, INVOKER_ERROR, Reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Performed:
    result: InvocationResult
    receipt: Receipt | None
    record_error: str = ""  # "evidence_unavailable: ..." when the invocation could not be recorded


def _digest(value: Any) -> str:
    if value is None:
        return ""
    try:
        return sha256_digest(canonical_json(value))
    except NotCanonicalizable:
        return sha256_digest(repr(value).encode("utf-8", "backslashreplace"))


class Executor:
    def __init__(self, *, sink: EvidenceSink | None, instance_id: str):
        self._sink = sink
        self._instance_id = instance_id
        self._to_the_end = RunToEnd()

    async def perform(
        self, call: ToolCall, identity: CallerIdentity, verdict: Verdict, invoker: ToolInvoker, *, upstream: str = ""
    ) -> Performed:
        """Carry the call out and record it. The caller going away (a gRPC deadline or cancel, an MCP
        client's notifications/cancelled) cancels only its wait: once begun, the call runs to its end
        and its invocation record is written, since the tool may act whether anyone waits or not."""
        if verdict.decision.outcome != "allow":
            raise ValueError(f"only an allowed call is carried out, not {verdict.decision.outcome}")
        if self._sink is not None and verdict.receipt is None:
            raise ValueError("the decision was not recorded: the call is not carried out")
        return await self._to_the_end(self._perform(call, identity, verdict, invoker, upstream))

    async def _perform(
        self, call: ToolCall, identity: CallerIdentity, verdict: Verdict, invoker: ToolInvoker, upstream: str
    ) -> Performed:
        started_at = rfc3339_now()
        started = time.perf_counter()
        sent: dict[str, Any] | None = None
        changes: list[dict] = []
        try:
            # The arguments as the Gate decided on them (the numbers rule: 1.0 is 1, -0.0 is 0), whatever
            # spelling the front door parsed: the tool gets the value policy, approvers and evidence saw.
            decided = normalize(call.arguments)
            sent, changes = apply_obligations(decided, dict(verdict.decision.obligations or {}))
        except ObligationError as exc:
            result = InvocationResult(NOT_CALLED, call.server, error=exc.reason)
        else:
            try:
                result = await invoker.invoke(replace(call, arguments=sent), verdict)
            except Exception as exc:  # an invoker bug must not escape as an allowed, unrecorded call
                log.exception("invoker failed")
                result = InvocationResult("failed", call.server, error=str(Reason(INVOKER_ERROR, type(exc).__name__)))
            if result.status == NOT_CALLED:
                sent = None
        duration_ms = (time.perf_counter() - started) * 1000
        fields = self._fields(call, identity, verdict, result, started_at, duration_ms, sent, changes, upstream)
        receipt, record_error = None, ""
        if self._sink is not None:
            try:
                receipt = await self._sink.append("invocation", fields)
            except (EvidenceError, OSError, RuntimeError) as exc:
                record_error = str(Reason(
                    EVIDENCE_UNAVAILABLE, f"the call was made but its invocation could not be recorded ({exc})"
                ))
                log.error("invocation of decision %s not recorded: %s", verdict.decision_id, exc)
        return Performed(result, receipt, record_error)

    def _fields(
        self,
        call: ToolCall,
        identity: CallerIdentity,
        verdict: Verdict,
        result: InvocationResult,
        started_at: str,
        duration_ms: float,
        sent: dict[str, Any] | None,
        changes: list[dict],
        upstream: str,
    ) -> dict:
        credential = result.credential
        return {
            "time": started_at,
            "decision_id": verdict.decision_id,
            "decision_hash": verdict.receipt.hash if verdict.receipt is not None else "",
            "call_id": verdict.call_id,
            "subject": {
                "spiffe_id": identity.subject.spiffe_id,
                "source": identity.subject.source,
                "svid_expires_at": identity.subject.svid_expires_at,
            },
            "tool": call.tool,
            "server": call.server,
            "upstream": upstream or result.upstream,
            "outcome": verdict.decision.outcome,
            "reasons": [result.error] if result.error else [],
            "status": result.status,
            "upstream_status": result.upstream_status,
            "duration_ms": round(duration_ms, 3),
            "arguments_digest": _digest(sent) if sent is not None else "",
            "arguments_changed": changes,
            "result_digest": _digest(result.result),
            "credential_kind": credential.kind if credential is not None else "",
            "credential_id": credential.id if credential is not None else "",
            "rollback_token": result.rollback_token,
            "autonomy": "human_approved" if verdict.approver else "autonomous",
            "approver": verdict.approver,
            "escalation_id": call.escalation_id if verdict.approver else "",
            "trace_id": verdict.trace.trace_id,
            "span_id": secrets.token_hex(8),
            "parent_span_id": verdict.trace.span_id,
            "sidecar": self._instance_id,
        }
