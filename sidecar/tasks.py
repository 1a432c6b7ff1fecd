"""Task lifetimes: `EndTask(task_id)` and an idle timeout end a task; calls under an ended task are denied.

    tasks = TaskRegistry(idle_seconds=900, max_tracked=100_000, sink=recorder, instance_id="pod-7")
    refusal = await tasks.check(task_id, identity, trace)   # None, or the reason the Gate denies with
    ending = await tasks.end(task_id, identity, parent)     # TaskEnd; raises TaskOwnerMismatch, TaskEndUnrecorded

A task belongs to whoever started it: the outermost agent of its first
call's delegation chain, or that call's caller when it has no chain (`owner`).
Later calls under it, and EndTask, are accepted from that agent or from any
agent it delegated to (whose verified chain starts with it); anyone else is
refused `not_task_owner`, so another agent can neither spend a task's call
budget, keep it from going idle, nor end it.

Bounded: `max_tracked` open and `max_tracked` ended tasks are kept in full,
the least recently used dropped past that. A dropped task never comes back
into use: its id goes into a Bloom filter (FORGOTTEN_TASKS of them at a
false-positive rate of FORGOTTEN_FALSE_POSITIVES, about 4 MB), and a call
under an id the filter holds is denied `task_ended`. Otherwise an agent could
end `max_tracked` fresh tasks to make the sidecar forget one it must keep
refusing, or open as many to make it forget whose task one is (the next
caller would own it) and what it has spent. The price is fail-closed: about
one new task id in ten million, and more once the filter holds more than it
was sized for, is taken for a dropped task and refused. Memory only: a
restart forgets every task (docs/mcp.md#tasks).

Every ending is written once to the evidence log as a `task_end` record
(fields: `task_end_fields`; docs/mcp.md#tasks), through the same EvidenceSink
as the other kinds. An idle timeout is found, and recorded, by the first call
under the task after it: that call is denied `task_ended`, and its decision
record follows the task_end record (the record's span is a child of that
call's span). A repeated EndTask writes no second record. Fail closed: a
task whose record cannot be written is ended all the same (its calls are
denied), the ending is kept unrecorded, and the next EndTask or call under
the task writes it again; until then EndTask raises TaskEndUnrecorded and
calls under the task are denied `evidence_unavailable`, so no recorded
`task_ended` decision precedes its task_end record in the chain.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from rbloom import Bloom

from sidecar.evidence import EvidenceError, EvidenceSink, Receipt, TraceContext
from sidecar.evidence.records import rfc3339
from sidecar.identity import CallerIdentity
from sidecar.reasons import EVIDENCE_UNAVAILABLE, NOT_TASK_OWNER, TASK_ENDED, Reason

END_TASK = "end_task"
IDLE_TIMEOUT = "idle_timeout"
TASK_END = "task_end"  # the evidence record kind
FORGOTTEN_TASKS = 1_000_000  # tasks dropped from memory that the Bloom filter is sized for
FORGOTTEN_FALSE_POSITIVES = 1e-7  # its false-positive rate at that size


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
    """The task ended (calls under it are denied), but its task_end record could not be written."""

    def __init__(self, ending: TaskEnd, cause: EvidenceError):
        super().__init__(
            f"task {ending.task_id!r} ended at {ending.ended_at} (calls under it are denied), but its "
            f"task_end record could not be written ({cause}); send EndTask again to record it"
        )
        self.ending = ending


@dataclass(slots=True)
class _Active:
    identity: CallerIdentity  # the caller of the task's first call, as verified then
    owner: str  # owner(identity): the agent the task belongs to
    last_seen: float  # monotonic clock
    last_wall: float  # wall clock of the same moment
    first_call: TraceContext  # the span of the task's first call, linked from its task_end record


@dataclass(slots=True)
class _Ended:
    owner: str  # SPIFFE ID
    why: str  # "was ended by EndTask at …" | "ended after N s without calls (idle timeout) at …"
    ended_at: str
    trace_id: str
    receipt: Receipt | None = None
    unrecorded: dict | None = None  # the task_end fields while they are not in the log
    lock: asyncio.Lock | None = None  # one writer of those fields at a time


def task_end_fields(
    *,
    task_id: str,
    identity: CallerIdentity,
    ended_by: str,
    ended_at: str,
    refusal: str,
    idle_seconds: float | None,
    last_call_at: str | None,
    trace: TraceContext,
    first_call: TraceContext | None,
    sidecar: str,
) -> dict[str, Any]:
    """The fields of a `task_end` record (the log redacts them and adds kind, seq, prev_hash, logged_at, hash)."""
    fields: dict[str, Any] = {
        "ended_at": ended_at,
        "task_id": task_id,
        "subject": _subject(identity.subject),
        "delegation": [_subject(d) for d in identity.delegation],
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
        fields["links"] = [{"trace_id": first_call.trace_id, "span_id": first_call.span_id, "type": "task_first_call"}]
    return fields


def _subject(subject: Any) -> dict:
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
        idle_seconds: float,
        max_tracked: int,
        sink: EvidenceSink | None = None,
        instance_id: str = "",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        """`sink` None: endings are not recorded (a registry without an evidence log)."""
        self._idle = idle_seconds
        self._max = max_tracked
        self._sink = sink
        self._instance_id = instance_id
        self._clock = clock
        self._wall = wall_clock
        self._active: OrderedDict[str, _Active] = OrderedDict()
        self._ended: OrderedDict[str, _Ended] = OrderedDict()
        # Ids of tasks dropped from _active or _ended: refused from then on (module docstring). Python's
        # hash of a str is keyed per process (SipHash), so nobody can choose ids that collide on purpose.
        self._forgotten = Bloom(FORGOTTEN_TASKS, FORGOTTEN_FALSE_POSITIVES)

    async def check(self, task_id: str, identity: CallerIdentity, trace: TraceContext) -> str | None:
        """Count a call under `task_id` (its span: `trace`); the reason to deny it when the task has ended, else None.

        `task_ended: …` for an ended task; `evidence_unavailable: …` while its task_end record cannot be written.
        """
        ended = self._ended.get(task_id)
        if ended is not None:
            if ended.unrecorded is not None:
                return await self._refusal_once_recorded(task_id, ended)
            return _refusal(task_id, ended.why)
        now = self._clock()
        active = self._active.get(task_id)
        if active is None:
            if task_id in self._forgotten:
                return _refusal(task_id, (
                    f"was dropped from memory: this sidecar keeps the last {self._max} open and {self._max} "
                    "ended tasks in full (usage.max_tracked)"
                ))
            self._active[task_id] = _Active(identity, owner(identity), now, self._wall(), trace)
            while len(self._active) > self._max:
                dropped, _ = self._active.popitem(last=False)
                self._forgotten.add(dropped)
            return None
        if owner(identity) != active.owner:
            return _not_owner(task_id, active.owner, identity)
        if self._idle > 0 and now - active.last_seen > self._idle:
            ended = self._end_idle(task_id, active, trace)
            return await self._refusal_once_recorded(task_id, ended)
        active.last_seen, active.last_wall = now, self._wall()
        self._active.move_to_end(task_id)
        return None

    async def end(self, task_id: str, identity: CallerIdentity, parent: TraceContext | None = None) -> TaskEnd:
        """End a task now (EndTask; `parent`: the caller's trace context, if it sent one).

        A task already ended (or idle past the timeout) answers `already_ended`; its one task_end record
        is not written again. Raises TaskOwnerMismatch (nothing changes) or TaskEndUnrecorded (it ended).
        """
        caller = owner(identity)
        ended = self._ended.get(task_id)
        already = ended is not None
        if ended is None:
            active = self._active.get(task_id)
            if active is not None and active.owner != caller:
                raise TaskOwnerMismatch(f"task {task_id!r} belongs to {active.owner}")
            if active is not None and self._idle > 0 and self._clock() - active.last_seen > self._idle:
                ended, already = self._end_idle(task_id, active, parent), True
            else:
                ended = self._end_now(task_id, identity, active, TraceContext.new(parent))
        elif ended.owner != caller:
            raise TaskOwnerMismatch(f"task {task_id!r} belongs to {ended.owner}")
        try:
            await self._record(ended)
        except EvidenceError as exc:
            raise TaskEndUnrecorded(TaskEnd(task_id, ended.ended_at, already, None, ended.trace_id), exc) from None
        return TaskEnd(task_id, ended.ended_at, already, ended.receipt, ended.trace_id)

    def _end_now(self, task_id: str, identity: CallerIdentity, active: _Active | None, trace: TraceContext) -> _Ended:
        self._active.pop(task_id, None)
        at = rfc3339(self._wall())
        why = f"was ended by EndTask at {at}"
        fields = task_end_fields(
            task_id=task_id,
            identity=identity,
            ended_by=END_TASK,
            ended_at=at,
            refusal=_refusal(task_id, why),
            idle_seconds=None,
            last_call_at=rfc3339(active.last_wall) if active is not None else None,
            trace=trace,
            first_call=active.first_call if active is not None else None,
            sidecar=self._instance_id,
        )
        return self._remember_ended(task_id, owner(identity), why, at, trace, fields)

    def _end_idle(self, task_id: str, active: _Active, parent: TraceContext | None) -> _Ended:
        """The task was idle past the timeout: ended now, found by the call (or EndTask) whose span is `parent`."""
        del self._active[task_id]
        at = rfc3339(self._wall())
        trace = TraceContext.new(parent)
        why = f"ended after {self._idle:g} s without calls (idle timeout) at {at}"
        fields = task_end_fields(
            task_id=task_id,
            identity=active.identity,
            ended_by=IDLE_TIMEOUT,
            ended_at=at,
            refusal=_refusal(task_id, why),
            idle_seconds=self._idle,
            last_call_at=rfc3339(active.last_wall),
            trace=trace,
            first_call=active.first_call,
            sidecar=self._instance_id,
        )
        return self._remember_ended(task_id, active.owner, why, at, trace, fields)

    def _remember_ended(
        self, task_id: str, task_owner: str, why: str, at: str, trace: TraceContext, fields: dict
    ) -> _Ended:
        ended = _Ended(task_owner, why, at, trace.trace_id)
        if self._sink is not None:
            ended.unrecorded, ended.lock = fields, asyncio.Lock()
        self._ended[task_id] = ended
        while len(self._ended) > self._max:
            dropped, _ = self._ended.popitem(last=False)
            self._forgotten.add(dropped)
        return ended

    async def _record(self, ended: _Ended) -> None:
        """Write the ending's task_end record unless it is written; raises EvidenceError (it stays unrecorded)."""
        if ended.unrecorded is None or ended.lock is None or self._sink is None:
            return
        async with ended.lock:  # a concurrent call or EndTask waits, then finds it written
            if ended.unrecorded is None:
                return
            ended.receipt = await self._sink.append(TASK_END, ended.unrecorded)
            ended.unrecorded, ended.lock = None, None

    async def _refusal_once_recorded(self, task_id: str, ended: _Ended) -> str:
        try:
            await self._record(ended)
        except EvidenceError as exc:
            return str(Reason(
                EVIDENCE_UNAVAILABLE,
                f"task {task_id!r} {ended.why}, but its task_end record could not be written ({exc}); "
                "denied until evidence works",
            ))
        return _refusal(task_id, ended.why)
