"""Work that runs to its end when its caller stops waiting.

    to_the_end = RunToEnd()                      # one per owner (the Gate, the executor, ...)
    verdict = await to_the_end(decide(call))     # cancelling this await cancels only the wait

A caller that goes away (a gRPC deadline or cancel, an MCP client's
notifications/cancelled) must not stop work whose effects outlive it halfway:
an escalation stored but never recorded, an upstream call made but never
recorded. `asyncio.shield` keeps the work running; the owner keeps a strong
reference to it until it is done, since nobody may be awaiting it any more
(asyncio holds only weak references to tasks).
"""

from __future__ import annotations

import asyncio
from typing import Coroutine, TypeVar

T = TypeVar("T")


class RunToEnd:
    def __init__(self) -> None:
        self._running: set[asyncio.Future] = set()

    async def __call__(self, work: Coroutine[object, object, T]) -> T:
        running = asyncio.ensure_future(work)
        self._running.add(running)
        running.add_done_callback(self._running.discard)
        return await asyncio.shield(running)
