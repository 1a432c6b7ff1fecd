"""The escalation state machine, its evidence, waiting, watching and expiry.

    pending ──approve──▶ approved ──allowed retry──▶ used
       │                    │
       ├──deny──▶ denied    └──use window passes──▶ expired
       └──TTL passes──▶ expired

Every transition is one compare-and-set in the store (store.py), so it
happens at most once however many approvers, retries or sidecars race, and
every transition and every refused attempt becomes a chained evidence record
(kinds escalation, approval, human_denial, expiry) in the escalated call's
trace: the approval's span is a child of the escalation's span and links to
it; the approved retry's decision uses the escalation's span as its parent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable

from sidecar.escalation import (
    APPROVED,
    DENIED,
    EXPIRED,
    ID_PREFIX,
    PENDING,
    USED,
    Approver,
    EscalationRecord,
    EscalationRefused,
    StoreError,
)
from sidecar.escalation.fingerprint import CallShape, differences
from sidecar.escalation.preview import argument_preview
from sidecar.escalation.store import EscalationStore
from sidecar.evidence import EvidenceError, TraceContext
from sidecar.evidence.records import rfc3339
from sidecar.evidence.redaction import Redactor
from sidecar.jsonvalues import normalize
from sidecar.policy.input import Approval

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"esc-[0-9a-f]{32}")
MAX_NOTE_CHARS = 2000
MAX_APPROVER_BYTES = 512
_NOTE_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def new_escalation_id() -> str:
    return ID_PREFIX + secrets.token_hex(16)


def iso(ts: float | None) -> str:
    return rfc3339(ts) if ts is not None else ""


def approver_matches(identity: str, patterns: Iterable[str]) -> bool:
    """Whether `identity` is among `patterns` (escalation.approvers).

    A workload (`spiffe://...`) matches only a pattern that is exactly its
    SPIFFE ID: approval is a human act, and a workload approves only where the
    config names it on purpose. Any other identity (a person relayed by a
    console: email:alice@example.org) also matches patterns where `*` stands
    for any run of characters (email:*@example.org).
    """
    for pattern in patterns:
        if "*" not in pattern or identity.startswith("spiffe://"):
            if identity == pattern:
                return True
        elif re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), identity):
            return True
    return False


def json_copy(value: Any, what: str) -> Any:
    """A plain-JSON copy of `value` for the store (numbers by the numbers rule), or None when it has no JSON form."""
    if value is None:
        return None
    try:
        return normalize(json.loads(json.dumps(value, allow_nan=False)))
    except (TypeError, ValueError) as exc:
        log.warning("escalation: %s is not JSON, not kept for approvers: %s", what, exc)
        return None


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


@dataclass(frozen=True)
class RetryCheck:
    """What a repeated call carrying an escalation id may do.

    refusal: the call is denied with this reason, policy is not asked.
    approval: hand it to policy as input.approval (and consume it on allow).
    Neither: the escalation is still pending; policy decides as for any call.
    parent: the trace the retry's decision joins (the escalation's span).
    """

    record: EscalationRecord | None
    approval: Approval | None = None
    refusal: str | None = None
    parent: TraceContext | None = None


class EscalationService:
    def __init__(
        self,
        store: EscalationStore,
        *,
        recorder: Any = None,
        ttl_seconds: float = 900.0,
        use_window_seconds: float = 300.0,
        await_max_seconds: float = 60.0,
        poll_interval_seconds: float = 1.0,
        sweep_interval_seconds: float = 5.0,
        approvers: Iterable[str] = (),
        console_identities: Iterable[str] = (),
        preview_arguments: bool = True,
        preview_max_bytes: int = 4096,
        redact_keys: Iterable[str] = (),
        notifier: Any = None,
        instance_id: str = "",
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self._recorder = recorder
        self.ttl = ttl_seconds
        self.use_window = use_window_seconds
        self.await_max = await_max_seconds
        self.poll_interval = poll_interval_seconds
        self.sweep_interval = sweep_interval_seconds
        self.approvers = tuple(approvers)
        self.console_identities = tuple(console_identities)
        self._preview = preview_arguments
        self._preview_max = preview_max_bytes
        self._redact_keys = tuple(redact_keys)
        # the evidence rule set: intent and notes are kept (store, webhook, approvers) without secrets
        self._redactor = Redactor(self._redact_keys)
        self.notifier = notifier
        self.instance_id = instance_id
        self.clock = clock
        self._subscribers: set[asyncio.Queue] = set()
        self._sweeper: asyncio.Task | None = None
        self._waiting: dict[str, list[float]] = {}  # escalation id -> deadlines of the AwaitDecisions open here

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.store.open()
        if self.sweep_interval > 0:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="escalation-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except (asyncio.CancelledError, Exception):
                pass
            self._sweeper = None
        if self.notifier is not None:
            await self.notifier.close()
        await self.store.close()

    def health(self) -> tuple[bool, str]:
        return self.store.health()

    # --------------------------------------------------------------- gate side

    def shape(self, identity: Any, tool: str, server: str, arguments_digest: str, task_id: str) -> CallShape:
        return CallShape(
            subject=identity.subject.spiffe_id,
            delegation=tuple(link.spiffe_id for link in identity.delegation),
            tool=tool,
            server=server,
            arguments_digest=arguments_digest,
            task_id=task_id,
        )

    async def escalate(
        self,
        *,
        identity: Any,
        call: Any,
        arguments_digest: str,
        reasons: Iterable[str],
        obligations: dict | None,
        policy_revision: str,
        decision_id: str,
        call_id: str,
        trace: TraceContext,
        catalog_entry: Any = None,
    ) -> tuple[EscalationRecord, bool]:
        """The escalation for this call: the active one for the same fingerprint, or a new one.

        `catalog_entry` is the tool's catalog entry policy decided with (input.tool.catalog).
        A new escalation keeps the call's intent, signals, that entry and (with
        escalation.preview_arguments) the unredacted arguments for approvers; a repeat of the
        call marks the agent as seen. Returns (record, created). Raises StoreError when the store fails.
        A new escalation is announced (evidence, webhook, watchers) by `announce`
        once the gate has recorded the decision that escalated.
        """
        shape = self.shape(identity, call.tool, call.server, arguments_digest, call.task_id)
        now = self.clock()
        preview = None
        if self._preview:
            preview = argument_preview(
                call.arguments, redact_keys=self._redact_keys, obligations=obligations, max_bytes=self._preview_max
            )
        record = EscalationRecord(
            id=new_escalation_id(),
            fingerprint=shape.fingerprint,
            subject=shape.subject,
            subject_source=identity.subject.source,
            delegation=shape.delegation,
            tool=call.tool,
            server=call.server,
            arguments_digest=arguments_digest,
            arguments_preview=preview,
            # kept without secrets, like the evidence (the fingerprint above is over the task id as sent)
            task_id=self._redactor.text(call.task_id),
            intent=self._redactor.text(call.intent),
            call_id=self._redactor.text(call_id),
            decision_id=decision_id,
            reasons=tuple(reasons),
            policy_revision=policy_revision,
            trace_id=trace.trace_id,
            span_id=TraceContext.new(trace).span_id,
            created_at=now,
            expires_at=now + self.ttl,
            state=PENDING,
            updated_at=now,
            sidecar=self.instance_id,
            signals=json_copy(self._redactor.value(call.signals)[0], "signals"),  # as the evidence records them
            catalog=json_copy(catalog_entry, "the catalog entry"),
            arguments=json_copy(call.arguments, "the arguments") if self._preview else None,
            agent_seen_at=now,
        )
        stored, created, expired = await self.store.create(record, now)
        for old in expired:
            await self._record_transition("expiry", old, outcome="expired",
                                          reasons=[self._expiry_reason(old)])
            self._publish(old)
        if not created:
            await self.store.agent_seen(stored.id, now)
        return stored, created

    async def announce(self, record: EscalationRecord, decision_span_id: str) -> None:
        """Record the new escalation, tell watchers, and fire the webhook (never waited for)."""
        await self._append(
            "escalation",
            self._fields(
                record,
                outcome="escalate",
                reasons=list(record.reasons),
                span_id=record.span_id,
                parent_span_id=decision_span_id,
                links=False,
            ),
        )
        self._publish(record)
        if self.notifier is not None:
            self.notifier.notify(record)

    async def withdraw(self, record: EscalationRecord) -> None:
        """A new escalation whose decision could not be recorded: expire it (best effort)."""
        try:
            withdrawn = await self.store.withdraw(record.id, self.clock())
        except StoreError:
            log.exception("could not withdraw escalation %s", record.id)
            return
        if withdrawn is not None:
            self._publish(withdrawn)

    async def check_retry(self, escalation_id: str, shape: CallShape) -> RetryCheck:
        """Judge a repeated call that carries `escalation_id` (raises StoreError)."""
        if not ID_PATTERN.fullmatch(escalation_id):
            return RetryCheck(None, refusal=f"escalation_unknown: there is no escalation {escalation_id!r}")
        record = await self.store.get(escalation_id)
        if record is None:
            return RetryCheck(None, refusal=f"escalation_unknown: there is no escalation {escalation_id!r}")
        if record.fingerprint != shape.fingerprint:
            escalated = CallShape(record.subject, record.delegation, record.tool, record.server,
                                  record.arguments_digest, record.task_id)
            what = "; ".join(differences(escalated, shape)) or "another call"
            return RetryCheck(
                record,
                refusal=f"escalation_mismatch: escalation {record.id} was made for another call "
                f"(this one has {what}); an approval holds only for the exact call",
            )
        parent = TraceContext(record.trace_id, record.span_id) if record.trace_id and record.span_id else None
        now = self.clock()
        if record.state in (PENDING, APPROVED) and self._overdue(record, now):
            record = await self.expire_one(record) or await self.store.get(record.id) or record
        if record.state == PENDING:
            return RetryCheck(record, parent=parent)
        if record.state == APPROVED:
            approval = Approval(record.id, record.approver, iso(record.decided_at))
            return RetryCheck(record, approval=approval, parent=parent)
        return RetryCheck(record, refusal=self._final_reason(record), parent=parent)

    async def consume(self, record: EscalationRecord, decision_id: str) -> tuple[bool, str]:
        """approved → used for the allowed retry; (False, reason) if another use or the clock won."""
        used = await self.store.consume(record.id, record.fingerprint, self.clock(), decision_id)
        if used is not None:
            self._publish(used)
            return True, ""
        current = await self.store.get(record.id) or record
        if current.state == APPROVED and self._overdue(current, self.clock()):
            current = await self.expire_one(current) or current
        return False, self._final_reason(current)

    # ----------------------------------------------------------- approvers side

    async def get(self, escalation_id: str) -> EscalationRecord:
        record = await self.store.get(escalation_id) if ID_PATTERN.fullmatch(escalation_id or "") else None
        if record is None:
            raise EscalationRefused("escalation_unknown", f"there is no escalation {escalation_id!r}", "NOT_FOUND")
        return record

    async def list(self, *, state: str = "", subject: str = "", tool: str = "", limit: int = 100) -> list[EscalationRecord]:
        return await self.store.list(state=state, subject=subject, tool=tool, limit=limit)

    async def approve(self, escalation_id: str, approver: Approver, note: str = "") -> EscalationRecord:
        return await self._decide(escalation_id, approver, note, APPROVED)

    async def deny(self, escalation_id: str, approver: Approver, note: str = "") -> EscalationRecord:
        return await self._decide(escalation_id, approver, note, DENIED)

    async def _decide(self, escalation_id: str, approver: Approver, note: str, state: str) -> EscalationRecord:
        kind = "approval" if state == APPROVED else "human_denial"
        verb = "approve" if state == APPROVED else "deny"
        record: EscalationRecord | None = None
        try:
            self._check_note(note)
            record = await self.get(escalation_id)
            self._check_approver(record, approver, verb)
            self._check_evidence_writable()
            now = self.clock()
            if record.state == PENDING and self._overdue(record, now):
                record = await self.expire_one(record) or record
            if record.state != PENDING:
                raise self._not_pending(record, verb)
            use_by = now + self.use_window if state == APPROVED else None
            decided = await self.store.decide(
                record.id, state, approver=approver.identity, via=approver.via, note=self._redactor.text(note), now=now,
                use_by=use_by
            )
            if decided is None:  # someone else decided first, or it expired this instant
                current = await self.store.get(record.id) or record
                if current.state == PENDING and self._overdue(current, self.clock()):
                    current = await self.expire_one(current) or current
                raise self._not_pending(current, verb)
        except EscalationRefused as refusal:
            await self._record_refusal(kind, escalation_id, refusal.record or record, approver, refusal, note)
            raise
        await self._record_transition(
            kind,
            decided,
            approver=approver,
            outcome=state,
            reasons=[
                f"{'approved' if state == APPROVED else 'denied_by_human'}: escalation {decided.id} "
                f"{'approved' if state == APPROVED else 'denied'} by {approver.identity}"
                + (f" via {approver.via}" if approver.via else "")
            ],
        )
        self._publish(decided)
        return decided

    def _check_note(self, note: str) -> None:
        if len(note) > MAX_NOTE_CHARS:
            raise EscalationRefused("invalid_note", f"the note is over {MAX_NOTE_CHARS} characters", "INVALID_ARGUMENT")
        if _NOTE_FORBIDDEN.search(note):
            raise EscalationRefused("invalid_note", "the note holds control characters", "INVALID_ARGUMENT")

    def _check_approver(self, record: EscalationRecord, approver: Approver, verb: str) -> None:
        problem = self.approver_problem(record, approver, verb)
        if problem is not None:
            raise problem

    def approver_problem(self, record: EscalationRecord, approver: Approver, verb: str) -> EscalationRefused | None:
        """Why `approver` may not `verb` this escalation (separation of duties, escalation.approvers), or None."""
        who = approver.identity
        if who == record.subject or (approver.via and approver.via == record.subject):
            return EscalationRefused(
                "self_approval",
                f"{who} cannot {verb} escalation {record.id}: it is that call's own subject "
                "(separation of duties)",
                "PERMISSION_DENIED",
                record,
            )
        if who in record.delegation or (approver.via and approver.via in record.delegation):
            return EscalationRefused(
                "delegation_approval",
                f"{who} cannot {verb} escalation {record.id}: it is in the call's delegation chain "
                "(separation of duties)",
                "PERMISSION_DENIED",
                record,
            )
        # Empty approvers (anyone) only in dev mode: config refuses it elsewhere.
        if self.approvers and not approver_matches(who, self.approvers):
            workload = " (a workload approves only when listed by its exact SPIFFE ID)" if who.startswith("spiffe://") else ""
            return EscalationRefused(
                "not_an_approver",
                f"{who} is not among escalation.approvers{workload}",
                "PERMISSION_DENIED",
                record,
            )
        return None

    def view_for(self, record: EscalationRecord, reader: Approver) -> ReaderView:
        """What `reader` is shown of `record` besides its stored fields (see ReaderView).

        The unredacted arguments go only to a reader who may decide the escalation now: it is
        pending, and the reader passes the same approver rules as an approval would.
        """
        waiting = record.agent_waiting(self.clock())
        if record.state != PENDING:
            return ReaderView(None, f"arguments_not_kept: escalation {record.id} is {record.state}; the "
                              "unredacted arguments are kept only while it is pending", waiting)
        if record.arguments is None:
            return ReaderView(None, "arguments_not_kept: escalation.preview_arguments is off, or the "
                              "arguments have no JSON form", waiting)
        problem = self.approver_problem(record, reader, "decide")
        if problem is not None:
            return ReaderView(None, problem.reason, waiting)
        return ReaderView(record.arguments, "", waiting)

    def _check_evidence_writable(self) -> None:
        health = getattr(self._recorder, "health", None)
        if health is None:
            return
        try:
            ok, detail = health()
        except Exception as exc:
            ok, detail = False, str(exc)
        if not ok:
            raise EscalationRefused(
                "evidence_unavailable",
                f"decisions cannot be recorded right now ({detail}); nothing was changed",
                "UNAVAILABLE",
            )

    def _not_pending(self, record: EscalationRecord, verb: str) -> EscalationRefused:
        if record.state == EXPIRED:
            return EscalationRefused("escalation_expired", f"escalation {record.id} expired at {iso(self._ended(record))}; "
                                     f"it can no longer be {verb}d", "FAILED_PRECONDITION", record)
        if record.state == USED:
            return EscalationRefused("approval_used", f"escalation {record.id} was approved by {record.approver} "
                                     f"and already used by decision {record.used_by_decision}", "FAILED_PRECONDITION", record)
        return EscalationRefused(
            "already_decided",
            f"escalation {record.id} was already {record.state} by {record.approver} at {iso(record.decided_at)}",
            "FAILED_PRECONDITION",
            record,
        )

    # ------------------------------------------------------------------ expiry

    def _overdue(self, record: EscalationRecord, now: float) -> bool:
        if record.state == PENDING:
            return record.expires_at <= now
        if record.state == APPROVED:
            return record.use_by is not None and record.use_by <= now
        return False

    def _ended(self, record: EscalationRecord) -> float:
        if record.use_by is not None and record.decided_at is not None:
            return record.use_by
        return record.expires_at

    def _expiry_reason(self, record: EscalationRecord) -> str:
        if record.approver and record.use_by is not None:
            return (f"approval_unused: the approval of escalation {record.id} by {record.approver} was not used "
                    f"by {iso(record.use_by)}")
        return f"escalation_expired: nobody decided escalation {record.id} by {iso(record.expires_at)}"

    async def expire_one(self, record: EscalationRecord) -> EscalationRecord | None:
        """Expire one overdue escalation (once, whoever notices first); the expired record or None."""
        changed = await self.store.expire(self.clock(), record.id)
        for old in changed:
            await self._record_transition("expiry", old, outcome="expired", reasons=[self._expiry_reason(old)])
            self._publish(old)
        return changed[0] if changed else None

    async def sweep(self) -> list[EscalationRecord]:
        """Expire everything overdue now; one evidence record each."""
        changed = await self.store.expire(self.clock())
        for old in changed:
            await self._record_transition("expiry", old, outcome="expired", reasons=[self._expiry_reason(old)])
            self._publish(old)
        return changed

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except StoreError as exc:
                log.warning("escalation sweeper: %s", exc)
            except Exception:
                log.exception("escalation sweeper failed")

    def _final_reason(self, record: EscalationRecord) -> str:
        if record.state == DENIED:
            note = f": {record.note}" if record.note else ""
            return (f"escalation_denied: escalation {record.id} was denied by {record.approver} "
                    f"at {iso(record.decided_at)}{note}")
        if record.state == USED:
            return (f"approval_used: the approval of escalation {record.id} was already used "
                    f"by decision {record.used_by_decision} at {iso(record.used_at)}; an approval holds once")
        if record.state == EXPIRED:
            return self._expiry_reason(record)
        if record.state == PENDING:
            return f"escalation_pending: escalation {record.id} is still waiting for an approver"
        return f"approval_unusable: escalation {record.id} is {record.state}"

    # ------------------------------------------------------- waiting, watching

    def _publish(self, record: EscalationRecord) -> None:
        for queue in list(self._subscribers):
            queue.put_nowait(record)

    def _subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def _unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    async def wait(self, escalation_id: str, timeout: float) -> tuple[EscalationRecord, bool]:
        """Until the escalation leaves `pending` or `timeout` (capped) passes: (record, timed_out)."""
        timeout = max(0.0, min(float(timeout), self.await_max))
        deadline = time.monotonic() + timeout
        queue = self._subscribe()
        waiting_until = self.clock() + timeout
        opened = False
        try:
            record = await self.get(escalation_id)
            opened = True  # from here on the finally below notes the end, whatever happens
            await self._agent_wait(record.id, opened_until=waiting_until)
            while True:
                if record.state == PENDING and self._overdue(record, self.clock()):
                    record = await self.expire_one(record) or await self.get(escalation_id)
                if record.state != PENDING:
                    return record, False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return record, True
                until_expiry = max(0.0, record.expires_at - self.clock()) + 0.005
                pause = min(remaining, self.poll_interval, until_expiry)
                try:
                    async with asyncio.timeout(pause):
                        while True:
                            changed = await queue.get()
                            if changed.id == escalation_id:
                                break
                except TimeoutError:
                    pass
                record = await self.get(escalation_id)
        finally:
            self._unsubscribe(queue)
            if opened:
                await self._agent_wait(escalation_id, closed_until=waiting_until)

    async def _agent_wait(self, escalation_id: str, *, opened_until: float | None = None,
                          closed_until: float | None = None) -> None:
        """Keep the store's agent_waiting_until in step with the AwaitDecisions open here: one opening
        (until `opened_until`) or closing (the one opened until `closed_until`). Best effort: a store
        failure only leaves approvers a stale "waiting" or "not waiting" hint, never fails the wait."""
        deadlines = self._waiting.setdefault(escalation_id, [])
        if opened_until is not None:
            deadlines.append(opened_until)
        else:
            deadlines.remove(closed_until)
            if not deadlines:
                del self._waiting[escalation_id]
        now = self.clock()
        try:
            if opened_until is not None:
                await self.store.agent_wait(escalation_id, now, opened_until=opened_until)
            else:
                await asyncio.shield(self.store.agent_wait(
                    escalation_id, now, closed_until=max([closed_until, *deadlines]),
                    then_until=max(deadlines, default=now)))
        except StoreError as exc:
            log.warning("escalation %s: could not note the agent's wait: %s", escalation_id, exc)

    async def watch(self, state: str = "", *, limit: int = 200) -> AsyncIterator[EscalationRecord]:
        """The current escalations (in `state`, or all), then every change as it happens.

        Changes made by this sidecar arrive at once; changes made by other
        sidecars sharing the store are found by polling every poll interval.
        """
        queue = self._subscribe()
        try:
            started = self.clock()
            seen: dict[str, tuple[str, float]] = {}

            def fresh(record: EscalationRecord) -> bool:
                key = (record.state, record.updated_at)
                if seen.get(record.id) == key:
                    return False
                seen[record.id] = key
                return not state or record.state == state

            for record in reversed(await self.store.list(state=state, limit=limit)):
                if fresh(record):
                    yield record
            last_poll = started
            while True:
                try:
                    async with asyncio.timeout(self.poll_interval):
                        record = await queue.get()
                    if fresh(record):
                        yield record
                except TimeoutError:
                    now = self.clock()
                    for record in await self.store.changed_since(last_poll - 2 * self.poll_interval):
                        if fresh(record):
                            yield record
                    last_poll = now
        finally:
            self._unsubscribe(queue)

    # ---------------------------------------------------------------- evidence

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
            "time": rfc3339(self.clock()),
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
            "sidecar": self.instance_id,
        }
        if links and record.trace_id and record.span_id:
            fields["links"] = [{"trace_id": record.trace_id, "span_id": record.span_id, "type": "escalation"}]
        return fields

    async def _record_transition(self, kind: str, record: EscalationRecord, *, outcome: str, reasons: list[str],
                                 approver: Approver | None = None) -> None:
        await self._append(kind, self._fields(record, outcome=outcome, reasons=reasons, approver=approver))

    async def record_refusal(
        self, kind: str, escalation_id: str, approver: Approver, refusal: EscalationRefused, note: str = ""
    ) -> None:
        """Record an attempt refused before it reached the state machine (e.g. an unverified approver)."""
        record = refusal.record
        if record is None and ID_PATTERN.fullmatch(escalation_id or ""):
            try:
                record = await self.store.get(escalation_id)
            except StoreError:
                record = None
        await self._record_refusal(kind, escalation_id, record, approver, refusal, note)

    async def _record_refusal(
        self,
        kind: str,
        escalation_id: str,
        record: EscalationRecord | None,
        approver: Approver,
        refusal: EscalationRefused,
        note: str,
    ) -> None:
        if record is None:
            fields = {
                "time": rfc3339(self.clock()),
                "escalation_id": escalation_id[:256] if isinstance(escalation_id, str) else "",
                "outcome": "refused",
                "reasons": [refusal.reason],
                "approver": approver.identity,
                "approver_via": approver.via,
                "approver_source": approver.source,
                "note": note[:MAX_NOTE_CHARS],
                "sidecar": self.instance_id,
            }
        else:
            fields = self._fields(record, outcome="refused", reasons=[refusal.reason], approver=approver,
                                  note=note[:MAX_NOTE_CHARS])
        await self._append(kind, fields)

    async def _append(self, kind: str, fields: dict) -> None:
        append = getattr(self._recorder, "append", None)
        if append is None:
            return
        try:
            await append(kind, fields)
        except EvidenceError as exc:
            log.error("evidence: could not record %s for escalation %s: %s", kind, fields.get("escalation_id"), exc)
