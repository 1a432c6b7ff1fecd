"""A human decides: escalations bound to the exact call, approved at most once.

When policy answers `escalate`, the gate asks the EscalationService for an
escalation (a new one, or the pending one for the very same call). A person
approves or denies it through the Approvals API (CLI, web console); the agent
then repeats the call with the escalation id, the service checks that the call
is exactly the one approved (fingerprint) and hands `input.approval` to policy,
and an allowed approved call consumes the approval.

This module holds the types every part shares; docs/escalation.md tells the
whole story.

    store.py        EscalationStore: SQLite (default) and PostgreSQL, atomic
                    compare-and-set state transitions
    fingerprint.py  what "the exact call" means
    service.py      EscalationService: the state machine and the expiry sweeper
    approvers.py    who may decide an escalation, what a reader is shown
    evidence.py     the escalation's evidence records and reason texts
    feed.py         ChangeFeed: waiting for and watching changes
    notify.py       webhook on new escalations
    grpc_api.py     ToolGate.AwaitDecision and the Approvals service
    client.py       an Approvals client (CLI and console)
    cli.py          `agent-sidecar approvals ...` and `agent-sidecar console`
    preview.py      the redacted argument preview approvers see
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.reasons import Reason

PENDING = "pending"
APPROVED = "approved"
DENIED = "denied"
EXPIRED = "expired"
USED = "used"
STATES = (PENDING, APPROVED, DENIED, EXPIRED, USED)
FINAL_STATES = (DENIED, EXPIRED, USED)

ID_PREFIX = "esc-"


@dataclass(frozen=True)
class EscalationRecord:
    """One escalation as stored. Times are Unix seconds (float), UTC."""

    id: str
    fingerprint: str
    subject: str  # the caller's SPIFFE ID
    subject_source: str
    delegation: tuple[str, ...]  # upstream agents' SPIFFE IDs, outermost first
    tool: str
    server: str
    arguments_digest: str
    arguments_preview: Any  # redacted, truncated arguments for approvers; None when not kept
    task_id: str
    intent: str
    call_id: str
    decision_id: str  # the decision that escalated
    reasons: tuple[str, ...]
    policy_revision: str
    trace_id: str  # the escalation's span: the approval and the approved retry join this trace
    span_id: str
    created_at: float
    expires_at: float  # a pending escalation expires then
    state: str = PENDING
    approver: str = ""
    approver_via: str = ""  # the console identity that relayed a human approver, if any
    decided_at: float | None = None
    note: str = ""
    use_by: float | None = None  # an approval must be used before then
    used_at: float | None = None
    used_by_decision: str = ""
    updated_at: float = 0.0
    sidecar: str = ""
    signals: Any = None  # what the agent's model said about the call (risk_score, model, ...), as policy saw it
    catalog: Any = None  # the tool's catalog entry when policy decided (description, owner, risk, reversible); None: not in the catalog
    # The arguments exactly as decided (what the tool will receive), unredacted: kept only while the
    # escalation is pending, shown only to a reader allowed to decide it (approvers.py), never in the
    # evidence log or the webhook. None once it left pending, or with escalation.preview_arguments off.
    arguments: Any = None
    agent_seen_at: float | None = None  # the agent last asked about this call (escalating call, repeat, AwaitDecision)
    agent_waiting_until: float | None = None  # an AwaitDecision is open until then (set at its start, cut at its end)
    # Put back from its evidence record after a host crash took it from the store (store.py, Durability);
    # its unredacted arguments and preview were not in the log, so approvers see only the digest.
    restored_at: float | None = None

    def agent_waiting(self, now: float) -> bool:
        """Whether the agent has an AwaitDecision open on this escalation at `now` (Unix seconds)."""
        return self.state == PENDING and self.agent_waiting_until is not None and self.agent_waiting_until > now

    def to_json(self) -> dict:
        """The escalation as plain JSON for the webhook; times in RFC 3339.

        Never holds the unredacted `arguments` (the webhook goes to chat tools, not to approvers
        the sidecar verified); `arguments_preview` is redacted."""
        from sidecar.evidence.records import rfc3339

        def at(ts: float | None) -> str:
            return rfc3339(ts) if ts is not None else ""

        return {
            "escalation_id": self.id,
            "state": self.state,
            "subject": self.subject,
            "subject_source": self.subject_source,
            "delegation": list(self.delegation),
            "tool": self.tool,
            "server": self.server,
            "arguments_digest": self.arguments_digest,
            "arguments_preview": self.arguments_preview,
            "task_id": self.task_id,
            "intent": self.intent,
            "call_id": self.call_id,
            "decision_id": self.decision_id,
            "reasons": list(self.reasons),
            "policy_revision": self.policy_revision,
            "trace_id": self.trace_id,
            "created_at": at(self.created_at),
            "expires_at": at(self.expires_at),
            "approver": self.approver,
            "approver_via": self.approver_via,
            "decided_at": at(self.decided_at),
            "note": self.note,
            "use_by": at(self.use_by),
            "used_at": at(self.used_at),
            "used_by_decision": self.used_by_decision,
            "sidecar": self.sidecar,
            "signals": self.signals,
            "tool_catalog": self.catalog,
            "agent_seen_at": at(self.agent_seen_at),
        }



class EscalationRefused(Exception):
    """A request about an escalation was refused; nothing was changed.

    `code` is the stable reason code, a constant of sidecar/reasons.py (ESCALATION_UNKNOWN,
    ESCALATION_EXPIRED, ALREADY_DECIDED, APPROVAL_USED, SELF_APPROVAL, ...), `status` the gRPC
    status name the Approvals API answers with.
    """

    def __init__(self, code: str, message: str, status: str = "FAILED_PRECONDITION",
                 record: EscalationRecord | None = None):
        super().__init__(str(Reason(code, message)))
        self.code = code
        self.message = message
        self.status = status
        self.record = record

    @property
    def reason(self) -> str:
        return str(Reason(self.code, self.message))


class StoreError(Exception):
    """The escalation store could not be reached or answered an error."""


@dataclass(frozen=True)
class Approver:
    """Who approves or denies: a verified SPIFFE ID, or a human relayed by a trusted console."""

    identity: str
    source: str  # workload_api | mtls | jwt_svid | dev | console
    via: str = ""  # the console's SPIFFE ID when a console relayed a human


__all__ = [
    "APPROVED",
    "DENIED",
    "EXPIRED",
    "FINAL_STATES",
    "ID_PREFIX",
    "PENDING",
    "STATES",
    "USED",
    "Approver",
    "EscalationRecord",
    "EscalationRefused",
    "StoreError",
]
