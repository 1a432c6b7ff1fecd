"""The evidence records of an escalation's life, and the reason texts they and refused retries give.

The state machine (service.py) decides what happens; this module only turns
each step into a chained evidence record (kinds escalation, approval,
human_denial, expiry, and refused attempts under the kind that was tried) in
the escalated call's trace: the escalation's span is a child of the decision
that escalated, every later record is a child of the escalation's span and
links to it. Kept apart so that every record of an escalation has the same
fields, whichever step wrote it (docs/evidence.md).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from sidecar.escalation import DENIED, EXPIRED, PENDING, USED, Approver, EscalationRecord, EscalationRefused
from sidecar.escalation.approvers import MAX_NOTE_CHARS
from sidecar.evidence import EvidenceError, EvidenceSink, TraceContext
from sidecar.evidence.records import rfc3339
from sidecar.reasons import (
    APPROVAL_UNUSABLE,
    APPROVAL_UNUSED,
    APPROVAL_USED,
    ESCALATION_DENIED,
    ESCALATION_EXPIRED,
    ESCALATION_PENDING,
    EVIDENCE_UNAVAILABLE,
    Reason,
)

log = logging.getLogger(__name__)


def iso(ts: float | None) -> str:
    """`ts` (Unix seconds) in RFC 3339, or "" for None."""
    return rfc3339(ts) if ts is not None else ""


def expiry_reason(record: EscalationRecord) -> str:
    """Why `record` expired: `approval_unused` (approved, not used by use_by) or `escalation_expired`."""
    if record.approver and record.use_by is not None:
        return str(Reason(
            APPROVAL_UNUSED,
            f"the approval of escalation {record.id} by {record.approver} was not used by {iso(record.use_by)}",
        ))
    return str(Reason(ESCALATION_EXPIRED, f"nobody decided escalation {record.id} by {iso(record.expires_at)}"))


def final_reason(record: EscalationRecord) -> str:
    """Why a retry cannot use `record` in its state: `escalation_denied`, `approval_used`, an expiry reason,
    `escalation_pending` or `approval_unusable`."""
    if record.state == DENIED:
        note = f": {record.note}" if record.note else ""
        return str(Reason(
            ESCALATION_DENIED,
            f"escalation {record.id} was denied by {record.approver} at {iso(record.decided_at)}{note}",
        ))
    if record.state == USED:
        return str(Reason(
            APPROVAL_USED,
            f"the approval of escalation {record.id} was already used "
            f"by decision {record.used_by_decision} at {iso(record.used_at)}; an approval holds once",
        ))
    if record.state == EXPIRED:
        return expiry_reason(record)
    if record.state == PENDING:
        return str(Reason(ESCALATION_PENDING, f"escalation {record.id} is still waiting for an approver"))
    return str(Reason(APPROVAL_UNUSABLE, f"escalation {record.id} is {record.state}"))


class EscalationEvidence:
    """Writes an escalation's evidence records through `recorder` (None: nothing is recorded).

    A record that cannot be written is logged, never raised: the transition already happened in the
    store. Before a human decision the service asks `check_writable`, so that a decision is refused
    rather than left unrecorded.
    """

    def __init__(self, recorder: EvidenceSink | None, *, instance_id: str, clock: Callable[[], float]):
        self._recorder = recorder
        self._instance_id = instance_id
        self._clock = clock

    def check_writable(self) -> None:
        """Raise EscalationRefused `evidence_unavailable` (status UNAVAILABLE) when the recorder reports itself unhealthy."""
        if self._recorder is None:
            return
        try:
            ok, detail = self._recorder.health()
        except Exception as exc:
            ok, detail = False, str(exc)
        if not ok:
            raise EscalationRefused(
                EVIDENCE_UNAVAILABLE,
                f"decisions cannot be recorded right now ({detail}); nothing was changed",
                "UNAVAILABLE",
            )

    def escalation(self, record: EscalationRecord, decision_span_id: str) -> tuple[str, dict]:
        """The (kind, fields) of a new escalation's `escalation` record: its own span, a child of
        the decision's span. The gate writes it in one unit with that decision (log.EvidenceLog.append)."""
        return "escalation", self._fields(
            record, outcome="escalate", reasons=list(record.reasons), span_id=record.span_id,
            parent_span_id=decision_span_id, links=False,
        )

    async def transition(self, kind: str, record: EscalationRecord, *, outcome: str, reasons: list[str],
                         approver: Approver | None = None) -> bool:
        """The record of a transition (`approval`, `human_denial`) to `record`'s state; False when it
        could not be written."""
        return await self._append(kind, self._fields(record, outcome=outcome, reasons=reasons, approver=approver))

    async def expiry(self, record: EscalationRecord) -> None:
        """The `expiry` record of an escalation that just expired (reason from `expiry_reason`)."""
        await self.transition("expiry", record, outcome="expired", reasons=[expiry_reason(record)])

    async def refusal(self, kind: str, escalation_id: str, record: EscalationRecord | None, approver: Approver,
                      refusal: EscalationRefused, note: str) -> None:
        """The `refused` record of an attempt to `kind`; without `record` only the attempt's own fields."""
        if record is None:
            fields = {
                "time": rfc3339(self._clock()),
                "escalation_id": escalation_id[:256] if isinstance(escalation_id, str) else "",
                "outcome": "refused",
                "reasons": [refusal.reason],
                "approver": approver.identity,
                "approver_via": approver.via,
                "approver_source": approver.source,
                "note": note[:MAX_NOTE_CHARS],
                "sidecar": self._instance_id,
            }
        else:
            fields = self._fields(record, outcome="refused", reasons=[refusal.reason], approver=approver,
                                  note=note[:MAX_NOTE_CHARS])
        await self._append(kind, fields)

    def _fields(
        self,
        record: EscalationRecord,
        *,
        outcome: str,
        reasons: list[str],
        span_id: str | None = None,
        parent_span_id: str | None = None,
        links: bool = True,
        approver: Approver | None = None,
        note: str | None = None,
    ) -> dict:
        trace_id = record.trace_id or TraceContext.new().trace_id
        fields: dict[str, Any] = {
            "time": rfc3339(self._clock()),
            "escalation_id": record.id,
            "decision_id": record.decision_id,
            "call_id": record.call_id,
            "subject": {"spiffe_id": record.subject, "source": record.subject_source},
            "delegation": [{"spiffe_id": link} for link in record.delegation],
            "tool": record.tool,
            "server": record.server,
            "arguments_digest": record.arguments_digest,
            "task_id": record.task_id,
            "fingerprint": record.fingerprint,
            "outcome": outcome,
            "reasons": reasons,
            "state": record.state,
            "policy_revision": record.policy_revision,
            "approver": approver.identity if approver else record.approver,
            "approver_via": approver.via if approver else record.approver_via,
            "approver_source": approver.source if approver else "",
            "note": record.note if note is None else note,
            "created_at": iso(record.created_at),
            "expires_at": iso(record.expires_at),
            "decided_at": iso(record.decided_at),
            "use_by": iso(record.use_by),
            "trace_id": trace_id,
            "span_id": span_id or TraceContext.new().span_id,
            "parent_span_id": parent_span_id if parent_span_id is not None else (record.span_id or None),
            "sidecar": self._instance_id,
        }
        if links and record.trace_id and record.span_id:
            fields["links"] = [{"trace_id": record.trace_id, "span_id": record.span_id, "type": "escalation"}]
        return fields

    async def _append(self, kind: str, fields: dict) -> bool:
        if self._recorder is None:
            return True
        try:
            await self._recorder.append(kind, fields)
        except EvidenceError as exc:
            log.error("evidence: could not record %s for escalation %s: %s", kind, fields.get("escalation_id"), exc)
            return False
        return True
