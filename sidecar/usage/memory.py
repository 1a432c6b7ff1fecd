"""Usage counters in this sidecar's memory (usage.store: memory, the default).

Calls per (subject, tool) in a sliding window, and calls per task. Bounded:
the least recently used keys are forgotten past `max_tracked`, so a caller
that invents task ids cannot grow memory without limit. Counts start from
zero when the sidecar starts and are not shared with other replicas; use the
postgres store for that (docs/configuration.md `usage`).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Callable

from sidecar.policy.input import Usage


class MemoryCounter:
    """`window_seconds`: the sliding window; `max_tracked`: keys kept per kind; `clock`: seconds."""

    def __init__(self, window_seconds: int, max_tracked: int, clock: Callable[[], float] = time.monotonic):
        self._window = window_seconds
        self._max = max_tracked
        self._clock = clock
        self._windows: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._tasks: OrderedDict[str, int] = OrderedDict()

    async def __aenter__(self) -> "MemoryCounter":
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        pass

    async def peek(self, subject: str, tool: str) -> Usage:
        """The usage a call made now would see (this one included), without counting anything."""
        horizon = self._clock() - self._window
        stamps = self._windows.get((subject, tool)) or ()
        recent = sum(1 for stamp in stamps if stamp > horizon)
        return Usage(calls_in_window=recent + 1, window_seconds=self._window, calls_in_task=0)

    async def count(self, subject: str, tool: str, task_id: str) -> Usage:
        """Count one call and return the usage including it; never raises."""
        now = self._clock()
        key = (subject, tool)
        stamps = self._windows.pop(key, None) or deque()
        horizon = now - self._window
        while stamps and stamps[0] <= horizon:
            stamps.popleft()
        stamps.append(now)
        self._windows[key] = stamps
        if len(self._windows) > self._max:
            self._windows.popitem(last=False)

        calls_in_task = 0
        if task_id:
            calls_in_task = self._tasks.pop(task_id, 0) + 1
            self._tasks[task_id] = calls_in_task
            if len(self._tasks) > self._max:
                self._tasks.popitem(last=False)
        return Usage(calls_in_window=len(stamps), window_seconds=self._window, calls_in_task=calls_in_task)

    def health(self) -> tuple[bool, str]:
        return True, "memory (this sidecar only)"

    async def aclose(self) -> None:
        pass
