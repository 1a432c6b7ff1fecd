"""What happened: the interface between the gate and the evidence stage.

The gate hands every decision to a Recorder as a DecisionEvent and answers
the agent only after `record` returns (the record is durable by then). A
Recorder that cannot make the record durable raises EvidenceError and the
gate turns the call into a deny: never an allowed call without evidence.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from sidecar.identity import CallerIdentity


@dataclass(frozen=True)
class TraceContext:
    """W3C trace context of one decision: ids are lowercase hex."""

    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits: the decision's execute_tool span
    parent_span_id: str | None = None

    @classmethod
    def new(cls, parent: "TraceContext | None" = None) -> "TraceContext":
        """A fresh span, in the parent's trace when there is one."""
        if parent is None:
            return cls(secrets.token_hex(16), secrets.token_hex(8))
        return cls(parent.trace_id, secrets.token_hex(8), parent.span_id)

    @classmethod
    def from_traceparent(cls, header: str | None) -> "TraceContext | None":
        """Parse a `traceparent` header (version 00); None when absent or malformed."""
        if not header:
            return None
        parts = header.strip().split("-")
        if len(parts) != 4 or parts[0] != "00":
            return None
        _, trace_id, span_id, _flags = parts
        try:
            if len(trace_id) != 32 or len(span_id) != 16 or int(trace_id, 16) == 0 or int(span_id, 16) == 0:
                return None
        except ValueError:
            return None
        return cls(trace_id.lower(), span_id.lower())


@dataclass(frozen=True)
class DecisionEvent:
    """Everything that answers who / what / why about one Authorize call."""

    time: str  # RFC 3339 UTC
    decision_id: str
    call_id: str
    identity: CallerIdentity | None  # None when the caller could not be verified
    tool: str
    server: str
    arguments: Any  # as received; may be malformed (then arguments_digest is of what was received)
    arguments_digest: str  # "sha256:<hex>" of the canonical arguments
    task_id: str
    intent: str
    signals: Any
    outcome: str  # allow | deny | escalate
    reasons: tuple[str, ...]
    obligations: dict[str, Any]
    policy_revision: str
    engine: str
    engine_error: str | None
    escalation_id: str
    approver: str
    trace: TraceContext
    sidecar: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    engine_decision_id: str = ""  # e.g. OPA's decision_id, to join OPA's decision logs
    # The policy input document exactly as sent to OPA; None when the call never reached policy.
    input_document: dict | None = None
    # OPA's own answer {"outcome", "reasons"} when the recorded outcome differs from it
    # (an approval that could not be used, an escalation store failure); None otherwise.
    policy_decision: dict | None = None
    # The shadow bundle's answer {"outcome", "reasons", "revision"[, "error"]}; None without one.
    shadow: dict | None = None


@dataclass(frozen=True)
class Receipt:
    """Where a record landed in the chain."""

    seq: int
    hash: str


class EvidenceError(Exception):
    """The record could not be made durable; the call must be denied."""


class EvidenceSink(Protocol):
    """Appends a record of a kind other than decision: escalation stage, invocations, task ends.

    `append(kind, fields)` redacts, chains and makes the record durable, then returns where it
    landed; raises EvidenceError when it cannot (sidecar.evidence.recorder.EvidenceRecorder.append).
    `health()` is (records can be written now, detail): asked before an act that must not go
    unrecorded, such as an approver's decision.
    """

    async def append(self, kind: str, fields: dict) -> Receipt: ...

    def health(self) -> tuple[bool, str]: ...


class EvidenceReader(Protocol):
    """Reads the log back: `records_since(since, match)` is the records logged at or after `since`
    (Unix seconds) whose raw line satisfies `match`, newest first; raises OSError
    (sidecar.evidence.readback.records_since)."""

    def records_since(self, since: float, match: Callable[[bytes], bool]) -> list[dict]: ...


class Recorder(Protocol):
    """Records decisions (sidecar.evidence.recorder.EvidenceRecorder)."""

    async def record(self, event: DecisionEvent, *, followed_by: Sequence[tuple[str, dict]] = ()) -> Receipt: ...

    def health(self) -> tuple[bool, str]: ...

    async def aclose(self) -> None: ...
