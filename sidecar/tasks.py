"""Task lifetimes: `EndTask(task_id)` and an idle timeout end a task; calls under an ended task are denied.

    tasks = TaskRegistry(idle_seconds=900, max_tracked=100_000)
    refusal = tasks.check(task_id, subject)     # None, or "task_ended: ..." (the Gate denies with it)
    ended_at, already = tasks.end(task_id, subject)   # raises TaskOwnerMismatch

A task belongs to the subject (SPIFFE ID) that first called under it; only
that subject may end it. Bounded: past `max_tracked` the least recently used
tasks are forgotten (an ended task forgotten this way would be usable again:
keep `max_tracked` above the tasks a sidecar sees in its lifetime window).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Callable


class TaskOwnerMismatch(Exception):
    """Someone other than the task's subject tried to end it."""


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class TaskRegistry:
    def __init__(
        self,
        *,
        idle_seconds: float,
        max_tracked: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self._idle = idle_seconds
        self._max = max_tracked
        self._clock = clock
        self._wall = wall_clock
        self._active: OrderedDict[str, tuple[str, float]] = OrderedDict()  # task → (owner, last seen)
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()  # task → (owner, why)

    def check(self, task_id: str, subject: str) -> str | None:
        """Count a call under `task_id`; the refusal reason when the task has ended, else None."""
        ended = self._ended.get(task_id)
        if ended is not None:
            return f"task_ended: task {task_id!r} {ended[1]}; start a new task"
        now = self._clock()
        owner, last = self._active.pop(task_id, (subject, now))
        if self._idle > 0 and now - last > self._idle:
            why = f"ended after {self._idle:g} s without calls (idle timeout) at {_rfc3339(self._wall())}"
            self._remember_ended(task_id, owner, why)
            return f"task_ended: task {task_id!r} {why}; start a new task"
        self._active[task_id] = (owner, now)
        while len(self._active) > self._max:
            self._active.popitem(last=False)
        return None

    def end(self, task_id: str, subject: str) -> tuple[str, bool]:
        """End a task: (RFC 3339 time it ended, whether it had ended already)."""
        ended = self._ended.get(task_id)
        if ended is not None:
            if ended[0] != subject:
                raise TaskOwnerMismatch(f"task {task_id!r} belongs to {ended[0]}")
            return ended[1].rsplit(" at ", 1)[-1], True
        owner, _ = self._active.pop(task_id, (subject, 0.0))
        if owner != subject:
            self._active[task_id] = (owner, self._clock())
            raise TaskOwnerMismatch(f"task {task_id!r} belongs to {owner}")
        at = _rfc3339(self._wall())
        self._remember_ended(task_id, owner, f"was ended by EndTask at {at}")
        return at, False

    def _remember_ended(self, task_id: str, owner: str, why: str) -> None:
        self._ended[task_id] = (owner, why)
        while len(self._ended) > self._max:
            self._ended.popitem(last=False)
