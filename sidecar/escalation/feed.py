"""The change feed: who hears of an escalation's changes, and how soon.

Every change the state machine (service.py) makes here is published to the
waiters (ToolGate.AwaitDecision, the MCP gateway's elicitation) and watchers
(Approvals.Watch) of this sidecar at once; changes made by other sidecars
sharing the store are found by polling it every poll interval. Kept apart from
the state machine so that deciding and telling stay separate: the feed never
changes an escalation itself, it asks its owner to settle one (expire it when
overdue) before reporting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Awaitable, Callable, Iterator

from sidecar.escalation import PENDING, EscalationRecord, StoreError
from sidecar.escalation.store import EscalationStore

log = logging.getLogger(__name__)


class ChangeFeed:
    """Publishes escalation changes to this sidecar's waiters and watchers; polls the store for the rest.

    `read(escalation_id)` is the owner's read (raises EscalationRefused for an unknown id, StoreError),
    `settle(record)` returns the record as it stands now, expired first when it is pending past its TTL.
    `poll_interval` and `await_max` are seconds; `clock` gives Unix seconds.
    """

    def __init__(
        self,
        store: EscalationStore,
        *,
        read: Callable[[str], Awaitable[EscalationRecord]],
        settle: Callable[[EscalationRecord], Awaitable[EscalationRecord]],
        poll_interval: float,
        await_max: float,
        clock: Callable[[], float],
    ):
        self._store = store
        self._read = read
        self._settle = settle
        self._poll_interval = poll_interval
        self._await_max = await_max
        self._clock = clock
        self._subscribers: set[asyncio.Queue] = set()
        self._waiting: dict[str, list[float]] = {}  # escalation id -> deadlines of the AwaitDecisions open here

    def publish(self, record: EscalationRecord) -> None:
        """Hand `record` (just changed) to every waiter and watcher of this sidecar; never blocks."""
        for queue in list(self._subscribers):
            queue.put_nowait(record)

    @contextlib.contextmanager
    def _subscription(self) -> Iterator[asyncio.Queue]:
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    async def wait(self, escalation_id: str, timeout: float) -> tuple[EscalationRecord, bool]:
        """Until the escalation leaves `pending` or `timeout` seconds (capped by await_max) pass: (record, timed_out).

        While it waits, the store's agent_waiting_until says so to approvers. Raises what `read` raises.
        """
        timeout = max(0.0, min(float(timeout), self._await_max))
        deadline = time.monotonic() + timeout
        waiting_until = self._clock() + timeout
        with self._subscription() as changes:
            record = await self._read(escalation_id)
            try:  # from here on the finally below notes the end, whatever happens
                await self._agent_wait(record.id, opened_until=waiting_until)
                while True:
                    record = await self._settle(record)
                    if record.state != PENDING:
                        return record, False
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return record, True
                    until_expiry = max(0.0, record.expires_at - self._clock()) + 0.005
                    pause = min(remaining, self._poll_interval, until_expiry)
                    try:
                        async with asyncio.timeout(pause):
                            while True:
                                changed = await changes.get()
                                if changed.id == escalation_id:
                                    break
                    except TimeoutError:
                        pass
                    record = await self._read(escalation_id)
            finally:
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
        now = self._clock()
        try:
            if opened_until is not None:
                await self._store.agent_wait(escalation_id, now, opened_until=opened_until)
            else:
                await asyncio.shield(self._store.agent_wait(
                    escalation_id, now, closed_until=max([closed_until, *deadlines]),
                    then_until=max(deadlines, default=now)))
        except StoreError as exc:
            log.warning("escalation %s: could not note the agent's wait: %s", escalation_id, exc)

    async def watch(self, state: str = "", *, limit: int = 200) -> AsyncIterator[EscalationRecord]:
        """The current escalations (in `state`, or all; at most `limit`, oldest first), then every change as it happens.

        Changes made by this sidecar arrive at once; changes made by other
        sidecars sharing the store are found by polling every poll interval.
        Raises StoreError when the store fails.
        """
        with self._subscription() as changes:
            started = self._clock()
            seen: dict[str, tuple[str, float]] = {}

            def fresh(record: EscalationRecord) -> bool:
                # Changes can reach the feed out of order (an approval published before the
                # escalation's own announcement): an older version never follows a newer one.
                key = (record.state, record.updated_at)
                before = seen.get(record.id)
                if before == key or (before is not None and record.updated_at < before[1]):
                    return False
                seen[record.id] = key
                return not state or record.state == state

            for record in reversed(await self._store.list(state=state, limit=limit)):
                if fresh(record):
                    yield record
            last_poll = started
            while True:
                try:
                    async with asyncio.timeout(self._poll_interval):
                        record = await changes.get()
                    if fresh(record):
                        yield record
                except TimeoutError:
                    now = self._clock()
                    for record in await self._store.changed_since(last_poll - 2 * self._poll_interval):
                        if fresh(record):
                            yield record
                    last_poll = now
