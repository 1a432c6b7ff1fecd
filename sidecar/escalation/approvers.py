"""Who may decide an escalation, what an approver may write, and what a reader is shown.

The rules live apart from the state machine (service.py) because two surfaces
apply them: a decision (approve, deny) must pass them, and the Approvals API
(grpc_api.py) shows the unredacted arguments only to a reader who would pass
them. Both read the same `ApproverRules`, so what an approver sees and what
they may decide cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from sidecar.escalation import PENDING, Approver, EscalationRecord, EscalationRefused
from sidecar.evidence.records import rfc3339
from sidecar.reasons import (
    ARGUMENTS_NOT_KEPT,
    DELEGATION_APPROVAL,
    INVALID_NOTE,
    NOT_AN_APPROVER,
    SELF_APPROVAL,
    Reason,
)

MAX_NOTE_CHARS = 2000
MAX_APPROVER_BYTES = 512
_NOTE_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def approver_matches(identity: str, patterns: Iterable[str]) -> bool:
    """Whether `identity` is among `patterns` (escalation.approvers).

    A workload (`spiffe://...`) matches only a pattern that is exactly its
    SPIFFE ID: approval is a human act, and a workload approves only where the
    config names it on purpose. Any other identity (a person relayed by a
    console: email:alice@example.org) also matches patterns where `*` stands
    for any run of characters but `@` and `,` (email:*@example.org): one
    mailbox at that domain, never `eve@evil.org@example.org` nor a list.
    """
    for pattern in patterns:
        if "*" not in pattern or identity.startswith("spiffe://"):
            if identity == pattern:
                return True
        elif re.fullmatch("[^@,]*".join(re.escape(part) for part in pattern.split("*")), identity):
            return True
    return False


def check_note(note: str) -> None:
    """Refuse an approver's note over MAX_NOTE_CHARS characters or holding control characters
    (raises EscalationRefused `invalid_note`, status INVALID_ARGUMENT)."""
    if len(note) > MAX_NOTE_CHARS:
        raise EscalationRefused(INVALID_NOTE, f"the note is over {MAX_NOTE_CHARS} characters", "INVALID_ARGUMENT")
    if _NOTE_FORBIDDEN.search(note):
        raise EscalationRefused(INVALID_NOTE, "the note holds control characters", "INVALID_ARGUMENT")


@dataclass(frozen=True)
class ReaderView:
    """What one reader of the Approvals API is shown beyond the stored record.

    arguments: the unredacted arguments, only for a reader allowed to decide the pending escalation;
    withheld: why `arguments` is None ("<code>: <text>"), "" when they are shown;
    agent_waiting: an AwaitDecision is open on it now.
    """

    arguments: Any
    withheld: str
    agent_waiting: bool


class ApproverRules:
    """Separation of duties plus escalation.approvers (the patterns, read once here).

    Empty `approvers` means anyone may decide: only dev mode allows that, config refuses it elsewhere.
    """

    def __init__(self, approvers: Iterable[str]):
        self.approvers = tuple(approvers)

    def problem(self, record: EscalationRecord, approver: Approver, verb: str) -> EscalationRefused | None:
        """Why `approver` may not `verb` this escalation, or None.

        The refusal (status PERMISSION_DENIED) has code `self_approval` (the approver, or the console that
        relayed them, is the call's subject), `delegation_approval` (it is in the call's delegation chain)
        or `not_an_approver` (it matches no pattern of escalation.approvers).
        """
        who = approver.identity
        if who == record.subject or (approver.via and approver.via == record.subject):
            return EscalationRefused(
                SELF_APPROVAL,
                f"{who} cannot {verb} escalation {record.id}: it is that call's own subject "
                "(separation of duties)",
                "PERMISSION_DENIED",
                record,
            )
        if who in record.delegation or (approver.via and approver.via in record.delegation):
            return EscalationRefused(
                DELEGATION_APPROVAL,
                f"{who} cannot {verb} escalation {record.id}: it is in the call's delegation chain "
                "(separation of duties)",
                "PERMISSION_DENIED",
                record,
            )
        if self.approvers and not approver_matches(who, self.approvers):
            workload = " (a workload approves only when listed by its exact SPIFFE ID)" if who.startswith("spiffe://") else ""
            return EscalationRefused(
                NOT_AN_APPROVER,
                f"{who} is not among escalation.approvers{workload}",
                "PERMISSION_DENIED",
                record,
            )
        return None

    def view(self, record: EscalationRecord, reader: Approver, now: float) -> ReaderView:
        """What `reader` is shown of `record` at `now` (Unix seconds) besides its stored fields.

        The unredacted arguments go only to a reader who may decide the escalation now: it is
        pending, and the reader passes the same rules as an approval would (`problem`).
        """
        waiting = record.agent_waiting(now)
        if record.state != PENDING:
            return ReaderView(None, str(Reason(
                ARGUMENTS_NOT_KEPT,
                f"escalation {record.id} is {record.state}; "
                "the unredacted arguments are kept only while it is pending",
            )), waiting)
        if record.arguments is None and record.restored_at is not None:
            return ReaderView(None, str(Reason(
                ARGUMENTS_NOT_KEPT,
                f"escalation {record.id} was restored from the evidence log at {rfc3339(record.restored_at)} "
                "after a host crash took it from the store; its arguments were not in the log, only their digest",
            )), waiting)
        if record.arguments is None:
            return ReaderView(None, str(Reason(
                ARGUMENTS_NOT_KEPT, "escalation.preview_arguments is off, or the arguments have no JSON form"
            )), waiting)
        problem = self.problem(record, reader, "decide")
        if problem is not None:
            return ReaderView(None, problem.reason, waiting)
        return ReaderView(record.arguments, "", waiting)
