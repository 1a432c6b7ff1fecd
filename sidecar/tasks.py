"""Task lifetimes: `EndTask(task_id)` and an idle timeout end a task; calls under an ended task are denied.

    async with TaskStore(evidence_dir / "tasks.db") as store, \
            TaskRegistry(store=store, idle_seconds=900, max_tracked=100_000, sink=recorder) as tasks:
        refusal = await tasks.check(task_id, identity, trace)   # None, or the reason the Gate denies with
        ending = await tasks.end(task_id, identity, parent)     # TaskEnd; raises TaskOwnerMismatch,
                                                                # TaskEndUnrecorded, TaskStateUnavailable

A task belongs to whoever started it: the outermost agent of its first
call's delegation chain, or that call's caller when it has no chain (`owner`).
Later calls under it, and EndTask, are accepted from that agent or from any
agent it delegated to (whose verified chain starts with it); anyone else is
refused `not_task_owner`, so another agent can neither spend a task's call
budget, keep it from going idle, nor end it.

Durable (task_store.py): a task's opening is stored before its first call goes
on, and its ending before EndTask answers or a call is refused for it, so
neither a restart nor memory pressure brings an ended task back into use or
hands an open one to another agent. Memory holds the `max_tracked` most
recently used open and ended tasks; any other is read back from the store when
a call names it. Last call times are written every FLUSH_SECONDS: after a
restart an idle timeout can come that much early, never late. A store that
cannot be read or written denies the call `task_state_unavailable`.

Every ending is written once to the evidence log as a `task_end` record
(fields: `task_end_fields`; docs/mcp.md#tasks), through the same EvidenceSink
as the other kinds. An idle timeout is found, and recorded, by the first call
under the task after it: that call is denied `task_ended`, and its decision
record follows the task_end record (the record's span is a child of that
call's span). A repeated EndTask writes no second record. Fail closed: a
task whose ending cannot be stored or recorded is ended all the same (its
calls are denied), and the next EndTask or call under the task tries again;
until then EndTask raises TaskEndUnrecorded and calls under the task are
denied `task_state_unavailable` or `evidence_unavailable`, so no recorded
`task_ended` decision precedes its task_end record in the chain.

Restored from the log: the task_end records outlive the store. A store that
lost endings (tasks.db deleted, emptied, or put back from an older backup)
would let an ended task's id work again, so entering the registry (`async
with`, before any call) reads the log's task_end records back from shortly
before the store's newest change (all of it for a store with none: an ending
is restored whatever its age) and stores each ending the store lacks, with
its first record's time and receipt: EndTask answers it as it first did. A
log that cannot be read back then stops the start (TaskStoreError), since
the store may lack endings that only the log holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from sidecar.evidence import EvidenceError, EvidenceReader, EvidenceSink, Receipt, TraceContext
from sidecar.evidence.readback import restore_since
from sidecar.evidence.records import parse_rfc3339, rfc3339
from sidecar.identity import CallerIdentity, Subject
from sidecar.reasons import EVIDENCE_UNAVAILABLE, NOT_TASK_OWNER, TASK_ENDED, TASK_STATE_UNAVAILABLE, Reason
from sidecar.task_store import StoredEnding, StoredTask, TaskStore, TaskStoreError

log = logging.getLogger("sidecar.tasks")

END_TASK = "end_task"
IDLE_TIMEOUT = "idle_timeout"
TASK_END = "task_end"  # the evidence record kind
FLUSH_SECONDS = 2.0  # how often last call times go to the store: how early an idle timeout may come after a restart


class TaskOwnerMismatch(Exception):
    """An agent that is not the task's owner, nor one its owner delegated to, tried to end it."""


def owner(identity: CallerIdentity) -> str:
    """Who a call acts for: the outermost agent of its delegation chain, else its caller (SPIFFE ID)."""
    return (identity.delegation[0] if identity.delegation else identity.subject).spiffe_id


@dataclass(frozen=True)
class TaskEnd:
    """A task's ending, as EndTask answers it."""

    task_id: str
    ended_at: str  # RFC 3339, UTC
    already_ended: bool  # it had ended before this request (EndTask or idle timeout)
    receipt: Receipt | None  # where its task_end record is in the evidence log; None without a sink
    trace_id: str  # the task_end record's trace


class TaskEndUnrecorded(Exception):
    """The task ended (calls under it are denied), but its ending could not be stored or recorded.

    `reason`: `task_state_unavailable: …` (the task store failed) or `evidence_unavailable: …` (the
    task_end record could not be written)."""

    def __init__(self, ending: TaskEnd, code: str, cause: Exception):
        verb = "store" if code == TASK_STATE_UNAVAILABLE else "record"
        super().__init__(
            f"task {ending.task_id!r} ended at {ending.ended_at} (calls under it are denied), but its "
            f"ending could not be {verb}d ({cause}); send EndTask again to {verb} it"
        )
        self.ending = ending
        self.reason = str(Reason(code, str(self)))


class TaskStateUnavailable(Exception):
    """The task store could not be read: nothing changed. `reason`: `task_state_unavailable: …`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class _Active:
    caller: dict  # caller_fields() of the task's first call, as verified then
    owner: str  # the agent the task belongs to
    last_seen: float  # monotonic clock
    last_wall: float  # wall clock of the same moment
    first_call: tuple[str, str] | None  # (trace_id, span_id) of its first call, linked from its task_end record


@dataclass(slots=True)
class _Ended:
    owner: str  # SPIFFE ID
    why: str  # "was ended by EndTask at …" | "ended after N s without calls (idle timeout) at …"
    ended_at: str
    trace_id: str
    receipt: Receipt | None = None
    unrecorded: dict | None = None  # the task_end fields while they are not in the log
    unstored: StoredTask | None = None  # the ending while it is not in the task store
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one writer of both at a time


def caller_fields(identity: CallerIdentity) -> dict[str, Any]:
    """Who made a call, as a task_end record names them: {"subject": {...}, "delegation": [{...}, ...]}."""
    return {"subject": _subject(identity.subject), "delegation": [_subject(d) for d in identity.delegation]}


def task_end_fields(
    *,
    task_id: str,
    caller: dict,
    ended_by: str,
    ended_at: str,
    refusal: str,
    idle_seconds: float | None,
    last_call_at: str | None,
    trace: TraceContext,
    first_call: tuple[str, str] | None,
    sidecar: str,
) -> dict[str, Any]:
    """The fields of a `task_end` record (the log redacts them and adds kind, seq, prev_hash, logged_at, hash)."""
    fields: dict[str, Any] = {
        "ended_at": ended_at,
        "task_id": task_id,
        "subject": caller["subject"],
        "delegation": caller["delegation"],
        "ended_by": ended_by,
        "idle_seconds": idle_seconds,
        "last_call_at": last_call_at,
        "reasons": [refusal],
        "trace_id": trace.trace_id,
        "span_id": trace.span_id,
        "parent_span_id": trace.parent_span_id,
        "sidecar": sidecar,
    }
    if first_call is not None:
        fields["links"] = [{"trace_id": first_call[0], "span_id": first_call[1], "type": "task_first_call"}]
    return fields


def ending_from_record(record: dict) -> StoredTask | None:
    """The ending a `task_end` record holds (task_end_fields, read back), with the record's receipt:
    what the store kept before it lost it. None when the record cannot tell it: a field missing or
    of another type, or its task id or caller redacted (a task id that looked like a secret)."""
    redacted = record.get("redacted") or ()
    if any(path == "task_id" or path.startswith(("subject", "delegation")) for path in redacted):
        return None
    try:
        task_id, at, trace_id = record["task_id"], record["ended_at"], record["trace_id"]
        seq, digest = record["seq"], record["hash"]
        caller = {"subject": record["subject"], "delegation": list(record["delegation"])}
        task_owner = (caller["delegation"][0] if caller["delegation"] else caller["subject"])["spiffe_id"]
        if record["ended_by"] == END_TASK:
            why = _why_ended(at)
        elif record["ended_by"] == IDLE_TIMEOUT:
            why = _why_idle(float(record["idle_seconds"]), at)
        else:
            return None
        last_call_at = parse_rfc3339(record.get("last_call_at") or at).timestamp()
        first_call = next(((link["trace_id"], link["span_id"]) for link in record.get("links") or ()
                           if link.get("type") == "task_first_call"), None)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None
    if not all(isinstance(v, str) for v in (task_id, at, trace_id, digest, task_owner)) or type(seq) is not int:
        return None
    return StoredTask(task_id, task_owner, caller, first_call, last_call_at,
                      StoredEnding(why, at, trace_id, None, Receipt(seq, digest)))


def _task_end_line(line: bytes) -> bool:
    """A raw log line that may be a task_end record (an agent's values may hold the same bytes: the parsed
    record's kind decides)."""
    return b'"kind":"task_end"' in line


def _why_ended(at: str) -> str:
    return f"was ended by EndTask at {at}"


def _why_idle(idle_seconds: float, at: str) -> str:
    return f"ended after {idle_seconds:g} s without calls (idle timeout) at {at}"


def _subject(subject: Subject) -> dict:
    return {"spiffe_id": subject.spiffe_id, "source": subject.source, "svid_expires_at": subject.svid_expires_at}


def _refusal(task_id: str, why: str) -> str:
    return str(Reason(TASK_ENDED, f"task {task_id!r} {why}; start a new task"))


def _not_owner(task_id: str, task_owner: str, identity: CallerIdentity) -> str:
    return str(Reason(NOT_TASK_OWNER, (
        f"task {task_id!r} belongs to {task_owner}; {owner(identity)} acts for another agent "
        "(a task's calls come from its owner or an agent it delegated to)"
    )))


class TaskRegistry:
    def __init__(
        self,
        *,
        store: TaskStore,
        idle_seconds: float,
        max_tracked: int,
        sink: EvidenceSink | None = None,
        evidence_reader: EvidenceReader | None = None,
        instance_id: str = "",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        flush_seconds: float = FLUSH_SECONDS,
    ):
        """`store` opened; `sink` None: endings are not recorded (a registry without an evidence log);
        `evidence_reader`: the log the store's lost endings are restored from on entering (module
        docstring); `flush_seconds`: how often, inside `async with`, last call times go to the store."""
        self._store = store
        self._idle = idle_seconds
        self._max = max_tracked
        self._sink = sink
        self._reader = evidence_reader
        self._instance_id = instance_id
        self._clock = clock
        self._wall = wall_clock
        self._active: OrderedDict[str, _Active] = OrderedDict()
        self._ended: OrderedDict[str, _Ended] = OrderedDict()
        self._loading: dict[str, asyncio.Event] = {}  # task ids being read from the store, set when done
        self._seen: dict[str, float] = {}  # last call times (wall clock) not yet in the store
        self._flush_seconds = flush_seconds
        self._flusher: asyncio.Task | None = None

    async def __aenter__(self) -> "TaskRegistry":
        """Restore the endings the store lost (raises TaskStoreError when it cannot), then start flushing."""
        await self._restore_from_evidence()
        self._flusher = asyncio.create_task(self._flush_every(self._flush_seconds), name="task-flush")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()

    async def flush(self) -> None:
        """Write the last call times gathered since the previous flush (a failure keeps them for the next)."""
        seen, self._seen = self._seen, {}
        try:
            await self._store.calls_seen(seen.items())
        except TaskStoreError as exc:
            log.warning("tasks: last call times not stored, kept for the next try: %s", exc)
            for task_id, at in seen.items():
                self._seen.setdefault(task_id, at)

    async def _restore_from_evidence(self) -> None:
        """Store the endings of the log's task_end records that the store lacks (module docstring).

        Only what was logged after the store's newest change can be missing from it (readback.restore_since),
        so only that window is read; a store with no change reads the whole log. Of several records of one
        task (a crash between its record and the store's mark of it), the first is its ending."""
        if self._reader is None:
            return
        now = self._wall()
        since = restore_since(await self._store.latest_change(), now, oldest=0.0)
        try:
            records = await asyncio.to_thread(self._reader.records_since, since, _task_end_line)
        except OSError as exc:
            raise TaskStoreError(
                f"the task store {self._store.path} may lack endings that only the evidence log holds, and the log "
                f"could not be read back ({exc}); not starting, so that no ended task comes back"
            ) from None
        endings: dict[str, StoredTask] = {}
        unreadable = []
        for record in reversed(records):  # oldest first
            if record.get("kind") != TASK_END:
                continue
            task = ending_from_record(record)
            if task is None:
                unreadable.append(record.get("seq"))
            else:
                endings.setdefault(task.task_id, task)
        restored = await self._store.restore(list(endings.values()), now)
        if restored:
            seqs = sorted(task.ending.receipt.seq for task in restored if task.ending and task.ending.receipt)
            log.warning(
                "tasks: restored %d ended task(s) from their task_end records in the evidence log (seq %d to %d, "
                "read back from %s): the task store %s had lost them (deleted, emptied, or put back from an older "
                "backup); they stay ended", len(restored), seqs[0], seqs[-1], rfc3339(since), self._store.path,
            )
        if unreadable:
            log.error("tasks: %d task_end record(s) read back from the evidence log name no task that can be "
                      "restored (seq %s): a task id or caller redacted in the record, or the record damaged; if the "
                      "task store lost those endings, they are not restored", len(unreadable), unreadable)

    async def _flush_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.flush()

    async def check(self, task_id: str, identity: CallerIdentity, trace: TraceContext) -> str | None:
        """Count a call under `task_id` (its span: `trace`); the reason to deny it, else None.

        `task_ended: …` for an ended task; `not_task_owner: …` for another agent's;
        `evidence_unavailable: …` or `task_state_unavailable: …` while the task's state cannot be kept.
        """
        entry = self._active.get(task_id) or self._ended.get(task_id)
        if entry is None:  # not in memory: from the store, where an unknown task is stored as this call's
            first = StoredTask(task_id, owner(identity), caller_fields(identity), (trace.trace_id, trace.span_id),
                               self._wall())
            entry = await self._entry(task_id, first)
            if isinstance(entry, str):
                return entry
        if isinstance(entry, _Ended):
            if entry.unrecorded is not None or entry.unstored is not None:
                return await self._refusal_once_recorded(task_id, entry)
            return _refusal(task_id, entry.why)
        assert entry is not None  # `first` was stored when the store had no such task
        if owner(identity) != entry.owner:
            return _not_owner(task_id, entry.owner, identity)
        now = self._clock()
        if self._idle > 0 and now - entry.last_seen > self._idle:
            ended = self._end_idle(task_id, entry, trace)
            return await self._refusal_once_recorded(task_id, ended)
        entry.last_seen, entry.last_wall = now, self._wall()
        self._seen[task_id] = entry.last_wall
        if task_id in self._active:
            self._active.move_to_end(task_id)
        return None

    async def end(self, task_id: str, identity: CallerIdentity, parent: TraceContext | None = None) -> TaskEnd:
        """End a task now (EndTask; `parent`: the caller's trace context, if it sent one).

        A task already ended (or idle past the timeout) answers `already_ended`; its one task_end record
        is not written again. Raises TaskOwnerMismatch or TaskStateUnavailable (nothing changes), or
        TaskEndUnrecorded (it ended).
        """
        caller = owner(identity)
        entry = await self._entry(task_id, None)
        if isinstance(entry, str):
            raise TaskStateUnavailable(entry)
        already = isinstance(entry, _Ended)
        if isinstance(entry, _Ended):
            if entry.owner != caller:
                raise TaskOwnerMismatch(f"task {task_id!r} belongs to {entry.owner}")
            ended = entry
        elif entry is not None and entry.owner != caller:
            raise TaskOwnerMismatch(f"task {task_id!r} belongs to {entry.owner}")
        elif entry is not None and self._idle > 0 and self._clock() - entry.last_seen > self._idle:
            ended, already = self._end_idle(task_id, entry, parent), True
        else:
            ended = self._end_now(task_id, identity, entry, TraceContext.new(parent))
        try:
            await self._record(task_id, ended)
        except (TaskStoreError, EvidenceError) as exc:
            code = TASK_STATE_UNAVAILABLE if isinstance(exc, TaskStoreError) else EVIDENCE_UNAVAILABLE
            raise TaskEndUnrecorded(TaskEnd(task_id, ended.ended_at, already, None, ended.trace_id), code, exc) from None
        return TaskEnd(task_id, ended.ended_at, already, ended.receipt, ended.trace_id)

    async def _entry(self, task_id: str, first: StoredTask | None) -> _Active | _Ended | str | None:
        """The task from memory, else from the store; a task the store does not know is stored as `first`
        (None: not stored, and None returned). A `task_state_unavailable: …` reason when the store fails."""
        while True:
            entry = self._active.get(task_id) or self._ended.get(task_id)
            if entry is not None:
                return entry
            loading = self._loading.get(task_id)
            if loading is None:
                break
            await loading.wait()  # another call is reading it; then look again (it may have failed)
        loading = self._loading[task_id] = asyncio.Event()
        try:
            if first is None:
                stored = await self._store.get(task_id)
            else:
                stored, _ = await self._store.open_task(first)
        except TaskStoreError as exc:
            log.error("tasks: %s", exc)
            return str(Reason(TASK_STATE_UNAVAILABLE, f"the state of task {task_id!r} cannot be read or stored ({exc})"))
        finally:
            del self._loading[task_id]
            loading.set()
        return self._remember(stored) if stored is not None else None

    def _remember(self, stored: StoredTask) -> _Active | _Ended:
        """Hold a task read from the store in memory."""
        ending = stored.ending
        if ending is not None:
            return self._remember_ended(stored.task_id, _Ended(
                stored.owner, ending.why, ending.ended_at, ending.trace_id,
                receipt=ending.receipt, unrecorded=ending.end_record if self._sink is not None else None,
            ))
        last_call_at = max(stored.last_call_at, self._seen.get(stored.task_id, 0.0))  # the newest, flushed or not
        idle_for = max(0.0, self._wall() - last_call_at)
        active = _Active(stored.caller, stored.owner, self._clock() - idle_for, last_call_at, stored.first_call)
        self._active[stored.task_id] = active
        while len(self._active) > self._max:
            self._active.popitem(last=False)  # stored: read back when a call names it again
        return active

    def _end_now(self, task_id: str, identity: CallerIdentity, active: _Active | None, trace: TraceContext) -> _Ended:
        self._active.pop(task_id, None)
        at = rfc3339(self._wall())
        why = _why_ended(at)
        caller = caller_fields(identity)
        fields = task_end_fields(
            task_id=task_id,
            caller=caller,
            ended_by=END_TASK,
            ended_at=at,
            refusal=_refusal(task_id, why),
            idle_seconds=None,
            last_call_at=rfc3339(active.last_wall) if active is not None else None,
            trace=trace,
            first_call=active.first_call if active is not None else None,
            sidecar=self._instance_id,
        )
        task = StoredTask(task_id, owner(identity), caller, active.first_call if active else None, self._wall())
        return self._new_ending(task, why, at, trace, fields)

    def _end_idle(self, task_id: str, active: _Active, parent: TraceContext | None) -> _Ended:
        """The task was idle past the timeout: ended now, found by the call (or EndTask) whose span is `parent`."""
        self._active.pop(task_id, None)
        at = rfc3339(self._wall())
        trace = TraceContext.new(parent)
        why = _why_idle(self._idle, at)
        fields = task_end_fields(
            task_id=task_id,
            caller=active.caller,
            ended_by=IDLE_TIMEOUT,
            ended_at=at,
            refusal=_refusal(task_id, why),
            idle_seconds=self._idle,
            last_call_at=rfc3339(active.last_wall),
            trace=trace,
            first_call=active.first_call,
            sidecar=self._instance_id,
        )
        task = StoredTask(task_id, active.owner, active.caller, active.first_call, active.last_wall)
        return self._new_ending(task, why, at, trace, fields)

    def _new_ending(self, task: StoredTask, why: str, at: str, trace: TraceContext, fields: dict) -> _Ended:
        """An ending that holds at once in memory; `_record` then stores it and writes its task_end record."""
        unrecorded = fields if self._sink is not None else None
        self._seen.pop(task.task_id, None)
        stored = replace(task, ending=StoredEnding(why, at, trace.trace_id, unrecorded))
        return self._remember_ended(task.task_id, _Ended(
            task.owner, why, at, trace.trace_id, unrecorded=unrecorded, unstored=stored
        ))

    def _remember_ended(self, task_id: str, ended: _Ended) -> _Ended:
        self._ended[task_id] = ended
        while len(self._ended) > self._max:
            # the oldest stored ending leaves memory (read back when named again); unstored ones stay
            dropped = next((k for k, e in self._ended.items() if e.unstored is None), None)
            if dropped is None:
                break
            del self._ended[dropped]
        return ended

    async def _record(self, task_id: str, ended: _Ended) -> None:
        """Store the ending and write its task_end record, whichever is not done yet.

        Raises TaskStoreError or EvidenceError (what is not done stays to do)."""
        if ended.unstored is None and ended.unrecorded is None:
            return
        async with ended.lock:  # a concurrent call or EndTask waits, then finds it done
            if ended.unstored is not None:
                await self._store.end_task(ended.unstored)
                ended.unstored = None
            if ended.unrecorded is None or self._sink is None:
                return
            ended.receipt = await self._sink.append(TASK_END, ended.unrecorded)
            ended.unrecorded = None
            try:
                await self._store.ending_recorded(task_id, ended.receipt)
            except TaskStoreError as exc:  # the record stands; a restart may write it once more
                log.warning("tasks: task %r: its task_end record (seq %d) is not marked in the store: %s",
                            task_id, ended.receipt.seq, exc)

    async def _refusal_once_recorded(self, task_id: str, ended: _Ended) -> str:
        try:
            await self._record(task_id, ended)
        except TaskStoreError as exc:
            return str(Reason(
                TASK_STATE_UNAVAILABLE,
                f"task {task_id!r} {ended.why}, but its ending could not be stored ({exc}); denied until it is",
            ))
        except EvidenceError as exc:
            return str(Reason(
                EVIDENCE_UNAVAILABLE,
                f"task {task_id!r} {ended.why}, but its task_end record could not be written ({exc}); "
                "denied until evidence works",
            ))
        return _refusal(task_id, ended.why)
