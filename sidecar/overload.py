"""Shedding load at the front door: while the event loop runs late, a call is denied at once.

    lag = LoopLag(max_lag_seconds=0.5)
    async with lag:                 # starts the ticker on the running loop
        refusal = lag.refusal()     # None, or "overloaded: ..." (the Gate denies with it, before policy)

Past saturation, calls queue in front of the Gate: gRPC (or the MCP gateway)
has accepted them, but the one event loop has not got to them yet. Each of
them would wait its turn and then spend its policy budget too, so the queue
grows and every answer comes late. How late the loop runs measures that
queue: a timer set every `interval_seconds` fires late by about as long as
a callback now waits for its turn. While that lag is over `max_lag_seconds`
for two ticks in a row, the Gate denies new calls with `overloaded` before
it asks OPA. (Two, so that one stall that is already over, such as a pause
of the whole process, sheds nothing.) Such a deny
is recorded like any other, and costs a fraction of a decision, so the queue
drains instead of growing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Callable

from sidecar.reasons import OVERLOADED, Reason


class LoopLag:
    def __init__(
        self,
        *,
        max_lag_seconds: float,
        interval_seconds: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_lag = max_lag_seconds
        self._interval = interval_seconds
        self._clock = clock
        self._late = (0.0, 0.0)  # how late the last two ticks fired (seconds)
        self._due = clock() + interval_seconds  # when the next tick should fire
        self._ticker: asyncio.Task | None = None

    async def __aenter__(self) -> "LoopLag":
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start ticking on the running loop."""
        self._due = self._clock() + self._interval
        self._late = (0.0, 0.0)
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="loop-lag")

    async def aclose(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    def lag(self) -> float:
        """Seconds the loop has been running late: the lesser lateness of the last two ticks."""
        return min(self._late)

    def refusal(self) -> str | None:
        """`overloaded: ...` while the loop is more than max_lag_seconds late; None otherwise (or when off)."""
        if self._ticker is None:
            return None
        lag = self.lag()
        if lag <= self.max_lag:
            return None
        return str(Reason(
            OVERLOADED,
            f"the sidecar is saturated (its event loop runs {lag * 1000:.0f} ms late, over "
            f"{self.max_lag * 1000:.0f} ms); denied at once instead of queueing",
        ))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            now = self._clock()
            self._late = (self._late[1], max(0.0, now - self._due))
            self._due = now + self._interval
