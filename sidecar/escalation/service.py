"""The escalation state machine and its expiry sweeper.

    pending ──approve──▶ approved ──allowed retry──▶ used
       │                    │  ◀──allow not recorded──┘
       ├──deny──▶ denied    └──use window passes──▶ expired
       └──TTL passes──▶ expired

Every transition is one compare-and-set in the store (store.py), so it
happens at most once however many approvers, retries or sidecars race, and
every transition and every refused attempt becomes a chained evidence record
(evidence.py) in the escalated call's trace. A human decision's record is
durable before the decision takes effect (claimed, recorded, then decided:
`_decide`), as an approval's use is recorded before its call runs (the gate's
allow record, `release` when it fails); an expiry only takes away, so its
record follows it; the approved retry's decision uses
the escalation's span as its parent. Who may decide is approvers.py's rule,
and waiters and watchers hear of every change through the feed (feed.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Mapping

from sidecar.concurrency import RunToEnd
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
from sidecar.escalation.approvers import ApproverRules, ReaderView, check_note
from sidecar.escalation.evidence import EscalationEvidence, final_reason, iso
from sidecar.escalation.feed import ChangeFeed
from sidecar.escalation.fingerprint import CallShape, differences
from sidecar.escalation.notify import Notifier
from sidecar.escalation.preview import argument_preview
from sidecar.escalation.store import EscalationStore
from sidecar.evidence import EvidenceReader, EvidenceSink, TraceContext
from sidecar.evidence.readback import restore_since
from sidecar.evidence.records import parse_rfc3339
from sidecar.evidence.redaction import Redactor
from sidecar.jsonvalues import normalize
from sidecar.policy.input import Approval
from sidecar.reasons import (
    ALREADY_DECIDED,
    APPROVAL_USED,
    ESCALATION_EXPIRED,
    ESCALATION_MISMATCH,
    ESCALATION_UNKNOWN,
    EVIDENCE_UNAVAILABLE,
    Reason,
)

if TYPE_CHECKING:
    from sidecar.calls import ToolCall
    from sidecar.identity import CallerIdentity

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"esc-[0-9a-f]{32}")


def new_escalation_id() -> str:
    return ID_PREFIX + secrets.token_hex(16)


def json_copy(value: Any, what: str) -> Any:
    """A plain-JSON copy of `value` for the store (numbers by the numbers rule), or None when it has no JSON form."""
    if value is None:
        return None
    try:
        return normalize(json.loads(json.dumps(value, allow_nan=False)))
    except (TypeError, ValueError) as exc:
        log.warning("escalation: %s is not JSON, not kept for approvers: %s", what, exc)
        return None


# What became of an escalation after its `escalation` record: the records that change its state.
_TRANSITIONS = {"approval": APPROVED, "human_denial": DENIED, "expiry": EXPIRED}


def _later_state(newest_first: list[dict]) -> dict[str, Any]:
    """The row fields the newest record of a change to one escalation gives, from that escalation's
    records newest first (none: still pending).

    A transition record (`approval`, `human_denial`, `expiry`) holds the escalation as it left it: its
    state, approver, note, decision and use-by times. An allowed decision that names the escalation and
    an approver is its use, whichever record the log holds first (a log written by a sidecar that let an
    approval take effect before its record can hold the use first). Refused attempts change nothing, nor
    does a decision without an approver."""
    uses = [r for r in newest_first
            if r.get("kind") == "decision" and r.get("outcome") == "allow" and r.get("approver")]
    transitions = [r for r in newest_first
                   if r.get("kind") in _TRANSITIONS and r.get("outcome") == _TRANSITIONS[r["kind"]] == r.get("state")]
    if uses:  # the approval's record, when the log holds it, says who approved and when
        record = next((r for r in transitions if r["kind"] == "approval"), uses[0])
    elif transitions:
        record = transitions[0]
    else:
        return {}
    fields = {
        "state": record["outcome"],
        "approver": record.get("approver") or "",
        "approver_via": record.get("approver_via") or "",
        "note": record.get("note") or "",
        "decided_at": _time(record.get("decided_at")),
        "use_by": _time(record.get("use_by")),
    }
    if uses:
        fields.update(state=USED, used_at=_time(uses[0].get("time")), used_by_decision=uses[0].get("decision_id") or "")
    return fields


def _time(value: Any) -> float | None:
    return parse_rfc3339(value).timestamp() if isinstance(value, str) and value else None


def _restorable(escalation: dict, decision: dict | None, later: dict[str, Any], now: float) -> EscalationRecord | None:
    """The row of an escalation from its `escalation` evidence record, the decision record it was
    written with (intent, signals, catalog entry) when found, and what the log says became of it
    later (`_later_state`: denied, approved, used, expired; nothing: pending). The unredacted
    arguments and the preview are not in the log. None when the records lack what a row needs."""
    try:
        created_at = parse_rfc3339(escalation["created_at"]).timestamp()
        decided = decision or {}
        tool_input = (decided.get("input") or {}).get("tool") or {}
        return EscalationRecord(
            id=escalation["escalation_id"],
            fingerprint=escalation["fingerprint"],
            subject=escalation["subject"]["spiffe_id"],
            subject_source=escalation["subject"].get("source", ""),
            delegation=tuple(link["spiffe_id"] for link in escalation.get("delegation") or ()),
            tool=escalation["tool"],
            server=escalation.get("server", ""),
            arguments_digest=escalation["arguments_digest"],
            arguments_preview=None,
            task_id=escalation.get("task_id", ""),
            intent=decided.get("intent") or "",
            call_id=escalation.get("call_id", ""),
            decision_id=escalation.get("decision_id", ""),
            reasons=tuple(escalation.get("reasons") or ()),
            policy_revision=escalation.get("policy_revision", ""),
            trace_id=escalation["trace_id"],
            span_id=escalation["span_id"],
            created_at=created_at,
            expires_at=parse_rfc3339(escalation["expires_at"]).timestamp(),
            updated_at=now,
            sidecar=escalation.get("sidecar", ""),
            signals=decided.get("signals"),
            catalog=tool_input.get("catalog"),
            agent_seen_at=created_at,
            restored_at=now,
            **{"state": PENDING, **later},
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        log.warning("escalations: cannot restore from record %s: %s", escalation.get("escalation_id"), exc)
        return None


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
    """The state machine over `store`, and the sweeper that expires what is overdue.

    Composes the approver rules (approvers.ApproverRules), the evidence writer
    (evidence.EscalationEvidence) and the change feed (feed.ChangeFeed), each built once here.
    `store` is opened and closed by its owner, around the service's `start` and `aclose`: the sidecar
    opens it before anything is written, so a store that cannot be opened refuses the start first.
    Times are Unix seconds from `clock`; durations are seconds. With `evidence_reader` (the log
    `recorder` writes to), `start` puts back the new escalations a host crash took from a store
    that does not sync them (store.py, Durability).
    """

    def __init__(
        self,
        store: EscalationStore,
        *,
        recorder: EvidenceSink | None = None,
        evidence_reader: EvidenceReader | None = None,
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
        notifier: Notifier | None = None,
        instance_id: str = "",
        clock: Callable[[], float] = time.time,
    ):
        if not store.syncs_new_escalations and evidence_reader is None:
            raise ValueError("a store that does not sync new escalations needs an evidence_reader to mend it after a crash")
        self.store = store
        self.ttl = ttl_seconds
        self.use_window = use_window_seconds
        self.sweep_interval = sweep_interval_seconds
        self.approvers = tuple(approvers)
        self.console_identities = tuple(console_identities)
        self._approver_rules = ApproverRules(self.approvers)
        self._preview = preview_arguments
        self._preview_max = preview_max_bytes
        # the evidence rule set: intent, notes and the preview are kept (store, webhook, approvers) without secrets
        self._redactor = Redactor(redact_keys)
        self.notifier = notifier
        self.instance_id = instance_id
        self.clock = clock
        self._evidence_reader = evidence_reader
        self._evidence = EscalationEvidence(recorder, instance_id=instance_id, clock=clock)
        self._feed = ChangeFeed(store, read=self.get, settle=self._settled, poll_interval=poll_interval_seconds,
                                await_max=await_max_seconds, clock=clock)
        self._sweeper: asyncio.Task | None = None
        # Transitions run to their end even when their caller goes away (an approver's deadline passing
        # while the store is slow): once the store has changed, its evidence record must follow.
        self._to_the_end = RunToEnd()

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> "EscalationService":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Mend the (opened) store from the log, then start the sweeper."""
        await self._restore_from_evidence()
        if self.sweep_interval > 0:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="escalation-sweeper")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except (asyncio.CancelledError, Exception):
                pass
            self._sweeper = None
        if self.notifier is not None:
            await self.notifier.aclose()

    def health(self) -> tuple[bool, str]:
        return self.store.health()

    async def _restore_from_evidence(self) -> None:
        """Put back the escalations whose `escalation` record is in the log but whose row the store lost
        (a power loss after an unsynced create; a store deleted or put back from an older copy), each in
        the state the log's later records give it (`_later_state`): a denial, an approval, its use or an
        expiry is never undone into pending. Only escalations created within the TTL and after the
        store's newest change (readback.restore_since) can be lost, so only that window of the log is
        read. A log that cannot be read is logged and restores nothing: an escalation missing from the
        store is refused (`escalation_unknown`), never allowed."""
        if self.store.syncs_new_escalations or self._evidence_reader is None:
            return
        now = self.clock()
        latest = await self.store.latest_change()
        since = restore_since(latest, now, oldest=now - self.ttl)
        try:
            records = await asyncio.to_thread(
                self._evidence_reader.records_since, since, lambda line: b'"escalation_id":"esc-' in line
            )
        except OSError as exc:
            log.error("escalations: could not read the evidence log back to restore lost escalations: %s", exc)
            return
        decisions = {r.get("decision_id"): r for r in records
                     if r.get("kind") == "decision" and r.get("outcome") == "escalate"}
        by_escalation: dict[Any, list[dict]] = {}
        for r in records:  # newest first, as read
            by_escalation.setdefault(r.get("escalation_id"), []).append(r)
        lost = []
        for r in records:
            if r.get("kind") != "escalation":
                continue
            try:
                later = _later_state(by_escalation[r.get("escalation_id")])
            except (TypeError, ValueError) as exc:  # a time that does not parse: left out, never taken for pending
                log.warning("escalations: cannot restore %s: its later records do not read: %s",
                            r.get("escalation_id"), exc)
                continue
            lost.append(_restorable(r, decisions.get(r.get("decision_id")), later, now))
        restored = await self.store.restore([record for record in lost if record is not None])
        for record in restored:
            log.warning(
                "escalations: restored %s (%s by %s, created %s, %s) from its evidence records: the store had "
                "lost it (a host crash before its commit reached the disk, or a store put back from an older "
                "copy); approvers see its digest, not its arguments",
                record.id, record.tool, record.subject, iso(record.created_at), record.state,
            )

    # --------------------------------------------------------------- gate side

    def shape(self, identity: CallerIdentity, tool: str, server: str, arguments_digest: str, task_id: str) -> CallShape:
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
        identity: CallerIdentity,
        call: ToolCall,
        arguments_digest: str,
        reasons: Iterable[str],
        obligations: dict | None,
        policy_revision: str,
        decision_id: str,
        call_id: str,
        trace: TraceContext,
        catalog_entry: Mapping[str, Any] | None = None,
    ) -> tuple[EscalationRecord, bool]:
        """The escalation for this call: the active one for the same fingerprint, or a new one.

        `catalog_entry` is the tool's catalog entry policy decided with (input.tool.catalog).
        A new escalation keeps the call's intent, signals, that entry and (with
        escalation.preview_arguments) the unredacted arguments for approvers; a repeat of the
        call marks the agent as seen. Returns (record, created). Raises StoreError when the store fails.
        A new escalation's evidence record (`escalation_record`) is written in one unit with the
        decision that escalated; once that is durable, the gate `announce`s it (watchers, webhook).
        """
        shape = self.shape(identity, call.tool, call.server, arguments_digest, call.task_id)
        now = self.clock()
        preview = None
        if self._preview:
            preview = argument_preview(
                call.arguments, redactor=self._redactor, obligations=obligations, max_bytes=self._preview_max
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
        await self._expired(expired)
        return stored, created

    def escalation_record(self, record: EscalationRecord, decision_span_id: str) -> tuple[str, dict]:
        """The (kind, fields) of the `escalation` evidence record of the new escalation `record`, a
        child of the decision span `decision_span_id`: the gate writes it with that decision."""
        return self._evidence.escalation(record, decision_span_id)

    def announce(self, record: EscalationRecord) -> None:
        """Tell watchers of a new escalation whose records are durable, and fire the webhook (never waited for)."""
        self._feed.publish(record)
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
            self._feed.publish(withdrawn)

    async def check_retry(self, escalation_id: str, shape: CallShape) -> RetryCheck:
        """Judge a repeated call that carries `escalation_id` (raises StoreError)."""
        if not ID_PATTERN.fullmatch(escalation_id):
            return RetryCheck(None, refusal=str(Reason(
                ESCALATION_UNKNOWN, f"there is no escalation {escalation_id!r}"
            )))
        record = await self.store.get(escalation_id)
        if record is None:
            return RetryCheck(None, refusal=str(Reason(
                ESCALATION_UNKNOWN, f"there is no escalation {escalation_id!r}"
            )))
        if record.fingerprint != shape.fingerprint:
            escalated = CallShape(record.subject, record.delegation, record.tool, record.server,
                                  record.arguments_digest, record.task_id)
            what = "; ".join(differences(escalated, shape)) or "another call"
            return RetryCheck(
                record,
                refusal=str(Reason(
                    ESCALATION_MISMATCH,
                    f"escalation {record.id} was made for another call "
                    f"(this one has {what}); an approval holds only for the exact call",
                )),
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
        return RetryCheck(record, refusal=final_reason(record), parent=parent)

    async def consume(self, record: EscalationRecord, decision_id: str) -> tuple[bool, str]:
        """approved → used for the allowed retry; (False, reason) if another use or the clock won."""
        used = await self.store.consume(record.id, record.fingerprint, self.clock(), decision_id)
        if used is not None:
            self._feed.publish(used)
            return True, ""
        current = await self.store.get(record.id) or record
        if current.state == APPROVED and self._overdue(current, self.clock()):
            current = await self.expire_one(current) or current
        return False, final_reason(current)

    async def release(self, record: EscalationRecord, decision_id: str) -> None:
        """The approval `record` that decision `decision_id` used, whose allow could not be recorded:
        approved again (the call did not run), so the same call can use it once the evidence works
        (best effort: a store that fails leaves it used, which refuses, never allows)."""
        try:
            released = await self.store.release(record.id, decision_id, self.clock())
        except StoreError:
            log.exception("could not give back the approval of escalation %s", record.id)
            return
        if released is not None:
            log.warning("escalation %s: the allow of decision %s could not be recorded; its approval holds again",
                        record.id, decision_id)
            self._feed.publish(released)

    # ----------------------------------------------------------- approvers side

    async def get(self, escalation_id: str) -> EscalationRecord:
        record = await self.store.get(escalation_id) if ID_PATTERN.fullmatch(escalation_id or "") else None
        if record is None:
            raise EscalationRefused(ESCALATION_UNKNOWN, f"there is no escalation {escalation_id!r}", "NOT_FOUND")
        return record

    async def list(self, *, state: str = "", subject: str = "", tool: str = "", limit: int = 100) -> list[EscalationRecord]:
        return await self.store.list(state=state, subject=subject, tool=tool, limit=limit)

    async def approve(self, escalation_id: str, approver: Approver, note: str = "") -> EscalationRecord:
        return await self._to_the_end(self._decide(escalation_id, approver, note, APPROVED))

    async def deny(self, escalation_id: str, approver: Approver, note: str = "") -> EscalationRecord:
        return await self._to_the_end(self._decide(escalation_id, approver, note, DENIED))

    async def _decide(self, escalation_id: str, approver: Approver, note: str, state: str) -> EscalationRecord:
        """Claim the pending escalation, write the decision's evidence record, and only then decide it in
        the store: until its record is durable a decision is not one (the escalation stays pending, so a
        retry racing the record cannot use an approval the log may never hold), and a record that
        cannot be written drops the claim, leaving the escalation pending for anyone to decide again."""
        kind = "approval" if state == APPROVED else "human_denial"
        verb = "approve" if state == APPROVED else "deny"
        record: EscalationRecord | None = None
        try:
            check_note(note)
            record = await self.get(escalation_id)
            problem = self._approver_rules.problem(record, approver, verb)
            if problem is not None:
                raise problem
            self._evidence.check_writable()
            now = self.clock()
            if record.state == PENDING and self._overdue(record, now):
                record = await self.expire_one(record) or record
            if record.state != PENDING:
                raise self._not_pending(record, verb)
            token = secrets.token_hex(16)
            claimed = await self.store.claim(record.id, token, now)
            if claimed is None:  # someone else is deciding or decided first, or it expired this instant
                raise await self._not_claimable(record, verb)
        except EscalationRefused as refusal:
            await self._evidence.refusal(kind, escalation_id, refusal.record or record, approver, refusal, note)
            raise
        decision = replace(
            claimed, state=state, approver=approver.identity, approver_via=approver.via,
            note=self._redactor.text(note), decided_at=now, use_by=now + self.use_window if state == APPROVED else None,
            arguments=None,
        )
        recorded = await self._evidence.transition(
            kind,
            decision,
            approver=approver,
            outcome=state,
            reasons=[
                f"{'approved' if state == APPROVED else 'denied_by_human'}: escalation {decision.id} "
                f"{'approved' if state == APPROVED else 'denied'} by {approver.identity}"
                + (f" via {approver.via}" if approver.via else "")
            ],
        )
        if not recorded:
            await self._unclaim(claimed, token)
            raise EscalationRefused(
                EVIDENCE_UNAVAILABLE,
                f"the {'approval' if state == APPROVED else 'denial'} of escalation {claimed.id} could not be "
                "recorded, so it was not made: the escalation is still pending and can be decided once "
                "evidence works",
                "UNAVAILABLE",
                claimed,
            )
        decided = await self.store.decide(
            decision.id, token, state, approver=decision.approver, via=decision.approver_via, note=decision.note,
            now=now, use_by=decision.use_by,
        )
        if decided is None:  # expired (or withdrawn) while its record was written: its expiry record follows
            raise self._not_pending(await self.store.get(decision.id) or claimed, verb)
        self._feed.publish(decided)
        return decided

    async def _not_claimable(self, record: EscalationRecord, verb: str) -> EscalationRefused:
        """Why `record`, pending a moment ago, could not be claimed: expired, decided, or still pending
        under another approver's claim."""
        current = await self.store.get(record.id) or record
        if current.state == PENDING and self._overdue(current, self.clock()):
            current = await self.expire_one(current) or current
        if current.state != PENDING:
            return self._not_pending(current, verb)
        return EscalationRefused(
            ALREADY_DECIDED,
            f"escalation {current.id} is being decided by another approver (its record is being written); "
            "it is pending again if that decision cannot be recorded",
            "FAILED_PRECONDITION",
            current,
        )

    async def _unclaim(self, record: EscalationRecord, token: str) -> None:
        """Drop the claim of a decision that could not be recorded (best effort: a store that fails
        leaves the escalation claimed, which refuses every decision, never allows, until it expires)."""
        try:
            await self.store.unclaim(record.id, token)
        except StoreError:
            log.exception("could not drop the claim on escalation %s", record.id)

    def view_for(self, record: EscalationRecord, reader: Approver) -> ReaderView:
        """What `reader` is shown of `record` now besides its stored fields (approvers.ApproverRules.view)."""
        return self._approver_rules.view(record, reader, self.clock())

    def _not_pending(self, record: EscalationRecord, verb: str) -> EscalationRefused:
        if record.state == EXPIRED:
            return EscalationRefused(ESCALATION_EXPIRED, f"escalation {record.id} expired at {iso(self._ended(record))}; "
                                     f"it can no longer be {verb}d", "FAILED_PRECONDITION", record)
        if record.state == USED:
            return EscalationRefused(APPROVAL_USED, f"escalation {record.id} was approved by {record.approver} "
                                     f"and already used by decision {record.used_by_decision}", "FAILED_PRECONDITION", record)
        return EscalationRefused(
            ALREADY_DECIDED,
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

    async def expire_one(self, record: EscalationRecord) -> EscalationRecord | None:
        """Expire one overdue escalation (once, whoever notices first); the expired record or None."""
        changed = await self._to_the_end(self._expire(record.id))
        return changed[0] if changed else None

    async def sweep(self) -> list[EscalationRecord]:
        """Expire everything overdue now; one evidence record each."""
        return await self._to_the_end(self._expire(None))

    async def _expire(self, escalation_id: str | None) -> list[EscalationRecord]:
        """The store's expiry (of one escalation, or of all overdue) and the records of what it expired."""
        changed = await self.store.expire(self.clock(), escalation_id)
        await self._expired(changed)
        return changed

    async def _expired(self, records: list[EscalationRecord]) -> None:
        """Record and publish escalations the store just expired."""
        for record in records:
            await self._evidence.expiry(record)
            self._feed.publish(record)

    async def _settled(self, record: EscalationRecord) -> EscalationRecord:
        """`record` as it stands now: expired first when it is pending past its TTL (the feed's wait asks)."""
        if record.state == PENDING and self._overdue(record, self.clock()):
            return await self.expire_one(record) or await self.get(record.id)
        return record

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except StoreError as exc:
                log.warning("escalation sweeper: %s", exc)
            except Exception:
                log.exception("escalation sweeper failed")

    # ------------------------------------------------------- waiting, watching

    async def wait(self, escalation_id: str, timeout: float) -> tuple[EscalationRecord, bool]:
        """Until the escalation leaves `pending` or `timeout` (capped) passes: (record, timed_out) (feed.ChangeFeed.wait)."""
        return await self._feed.wait(escalation_id, timeout)

    def watch(self, state: str = "", *, limit: int = 200) -> AsyncIterator[EscalationRecord]:
        """The current escalations (in `state`, or all), then every change as it happens (feed.ChangeFeed.watch)."""
        return self._feed.watch(state, limit=limit)

    # ---------------------------------------------------------------- evidence

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
        await self._evidence.refusal(kind, escalation_id, record, approver, refusal, note)
