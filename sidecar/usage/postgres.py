"""Usage counters in PostgreSQL (usage.store: postgres), shared by every sidecar on the database.

Replicas of one agent (the same SPIFFE ID) behind several sidecars then share
one sliding window per (subject, tool) and one count per task, and the counts
outlive a sidecar restart. Two tables (created on first use):

    sidecar_usage_calls (key, at)           one row per call inside the window
    sidecar_usage_tasks (key, calls, updated_at)

`key` is a sha256 of the logical key (subject and tool; task id), so any
string a caller sends (NUL, lone surrogates, 256 bytes) is a valid key and
the index stays small. Counting one call is one transaction that first takes
`pg_advisory_xact_lock` on the (subject, tool) key, then forgets, adds and
counts in one statement, so concurrent calls from many sidecars are counted
one after another and each sees every earlier one: no two calls are told the
same `calls_in_window`. The task count is one
`INSERT ... ON CONFLICT DO UPDATE ... RETURNING`, atomic on its own.

Times are Unix seconds from the counting sidecar's clock (sidecars keep NTP
time anyway: SVIDs and JWTs depend on it). Each count forgets its own key's
calls that left the window; a background task deletes every key's old calls
and the tasks idle for `task_idle_seconds` once per window, outside any
count. Every sidecar sharing a database must use the same
`usage.window_seconds`.

Failures (unreachable, timeout, any database error) raise UsageUnavailable,
or, with a `fallback` counter (usage.on_store_error: memory), are counted
there instead while the database is unreachable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Any, Callable

import psycopg
import psycopg_pool

from sidecar.pgconninfo import where
from sidecar.policy.input import Usage
from sidecar.usage import UsageCounter, UsageUnavailable

log = logging.getLogger(__name__)

CALLS = "sidecar_usage_calls"
TASKS = "sidecar_usage_tasks"
# pg_advisory_xact_lock key serialising schema creation among sidecars ("usage" in ASCII).
SCHEMA_LOCK = 0x7573616765

SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {CALLS} (key BYTEA NOT NULL, at DOUBLE PRECISION NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {CALLS}_key_at ON {CALLS} (key, at)",
    f"CREATE INDEX IF NOT EXISTS {CALLS}_at ON {CALLS} (at)",
    f"CREATE TABLE IF NOT EXISTS {TASKS} (key BYTEA PRIMARY KEY, calls BIGINT NOT NULL, "
    "updated_at DOUBLE PRECISION NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {TASKS}_updated ON {TASKS} (updated_at)",
)
LOCK_KEY = "SELECT pg_advisory_xact_lock(%(lock)s)"
# One statement, run after LOCK_KEY (so its snapshot holds every call counted before):
# forget this key's calls that left the window, add this one, and count the window.
# The SELECT sees the table as it was before the statement, hence the + 1 for this call.
COUNT_CALL = (
    f"WITH gone AS (DELETE FROM {CALLS} WHERE key = %(key)s AND at <= %(horizon)s), "
    f"added AS (INSERT INTO {CALLS} (key, at) VALUES (%(key)s, %(now)s)) "
    f"SELECT count(*) + 1 FROM {CALLS} WHERE key = %(key)s AND at > %(horizon)s"
)
ADD_TASK_CALL = (
    f"INSERT INTO {TASKS} (key, calls, updated_at) VALUES (%s, 1, %s) "
    f"ON CONFLICT (key) DO UPDATE SET calls = {TASKS}.calls + 1, updated_at = excluded.updated_at RETURNING calls"
)
PEEK_CALLS = f"SELECT count(*) + 1 FROM {CALLS} WHERE key = %(key)s AND at > %(horizon)s"
PURGE_CALLS = f"DELETE FROM {CALLS} WHERE at <= %s"
PURGE_TASKS = f"DELETE FROM {TASKS} WHERE updated_at <= %s"


def _digest(*parts: str) -> bytes:
    return hashlib.sha256(json.dumps(parts).encode("ascii")).digest()


class PostgresCounter:
    """Shared counters on `dsn` (libpq string or URL; "" = the PG* environment variables).

    `timeout_ms` bounds one count (waiting for a connection included);
    `pool_size` is the connections this sidecar keeps; `fallback` counts
    while the database cannot (None = raise UsageUnavailable).
    """

    def __init__(
        self,
        dsn: str,
        *,
        window_seconds: int,
        task_idle_seconds: float,
        timeout_ms: int,
        pool_size: int,
        fallback: UsageCounter | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self._dsn = dsn
        self._where = f"postgres {where(dsn)}"  # the PG* variables are the process's: read once
        self._window = window_seconds
        self._task_idle = task_idle_seconds
        self._timeout = timeout_ms / 1000
        self._timeout_ms = timeout_ms
        self._pool_size = pool_size
        self._fallback = fallback
        self._clock = clock
        self._pool: Any = None
        self._schema_ready = False
        self._purger: asyncio.Task | None = None
        self._last_error: str | None = None

    def describe(self) -> str:
        return self._where

    async def __aenter__(self) -> "PostgresCounter":
        try:
            await self.open()
        except BaseException:
            await self.aclose()  # what opened before the failure (the fallback, the pool)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        if self._fallback is not None:
            await self._fallback.open()
        self._pool = psycopg_pool.AsyncConnectionPool(
            self._dsn,
            min_size=1,
            max_size=self._pool_size,
            open=False,
            timeout=self._timeout,
            check=psycopg_pool.AsyncConnectionPool.check_connection,  # a connection broken by a database restart is replaced
            kwargs={
                "autocommit": True,
                "options": f"-c statement_timeout={self._timeout_ms}",
                "connect_timeout": max(2, int(self._timeout) + 1),
            },
            name="sidecar-usage",
        )
        await self._pool.open(wait=False)
        self._purger = asyncio.create_task(self._purge_forever(), name="usage-purge")

    async def count(self, subject: str, tool: str, task_id: str) -> Usage:
        """Count one call in the shared tables; see the module docstring for the transaction."""
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    usage = await self._count(subject, tool, task_id)
                except Exception as exc:
                    if not isinstance(exc, psycopg.errors.UndefinedTable):
                        raise
                    self._schema_ready = False  # a new or restored database: create the tables, count again
                    usage = await self._count(subject, tool, task_id)
        except Exception as exc:
            reason = self._failure(exc)
            if reason is None:
                raise
            if self._last_error is None:
                log.warning("usage store %s cannot count: %s", self.describe(), reason)
            self._last_error = reason
            if self._fallback is not None:
                return await self._fallback.count(subject, tool, task_id)
            raise UsageUnavailable(f"{self.describe()}: {reason}") from None
        if self._last_error is not None:
            log.info("usage store %s counts again", self.describe())
        self._last_error = None
        return usage

    async def peek(self, subject: str, tool: str) -> Usage:
        """The window a call made now would see, read without counting (tools/list)."""
        if self._pool is None:
            raise UsageUnavailable(f"{self.describe()}: the usage store is closed")
        key = _digest("window", subject, tool)
        try:
            async with asyncio.timeout(self._timeout):
                async with self._pool.connection() as conn:
                    await self._ensure_schema(conn)
                    row = await (await conn.execute(PEEK_CALLS, {"key": key, "horizon": self._clock() - self._window})).fetchone()
        except Exception as exc:
            reason = self._failure(exc)
            if reason is None:
                raise
            if self._fallback is not None:
                return await self._fallback.peek(subject, tool)
            raise UsageUnavailable(f"{self.describe()}: {reason}") from None
        return Usage(calls_in_window=int(row[0]), window_seconds=self._window, calls_in_task=0)

    @staticmethod
    def _failure(exc: Exception) -> str | None:
        """What went wrong, for a failure of the store; None for anything else (a bug: re-raised)."""
        if isinstance(exc, TimeoutError):
            return "no answer within usage.timeout_ms (database unreachable or slow)"
        if isinstance(exc, psycopg_pool.PoolTimeout):
            return "no connection within usage.timeout_ms (database unreachable?)"
        if isinstance(exc, (psycopg.Error, psycopg_pool.PoolClosed)):
            text = str(exc).strip()
            return text.splitlines()[0] if text else type(exc).__name__
        return None

    async def _count(self, subject: str, tool: str, task_id: str) -> Usage:
        now = self._clock()
        horizon = now - self._window
        key = _digest("window", subject, tool)
        lock = int.from_bytes(key[:8], "big", signed=True)
        if self._pool is None:
            raise UsageUnavailable(f"{self.describe()}: the usage store is closed")
        async with self._pool.connection() as conn:
            await self._ensure_schema(conn)
            async with conn.transaction():
                await conn.execute(LOCK_KEY, {"lock": lock})
                row = await (await conn.execute(COUNT_CALL, {"key": key, "horizon": horizon, "now": now})).fetchone()
                calls_in_task = 0
                if task_id:
                    task = await (await conn.execute(ADD_TASK_CALL, (_digest("task", task_id), now))).fetchone()
                    calls_in_task = int(task[0])
        return Usage(calls_in_window=int(row[0]), window_seconds=self._window, calls_in_task=calls_in_task)

    async def purge(self) -> None:
        """Delete calls that left the window and tasks idle past task_idle_seconds (all keys).

        Runs every window_seconds in the background from open() until aclose(),
        never inside a count; a failure is logged and tried again next time.
        """
        now = self._clock()
        if self._pool is None:
            return
        async with self._pool.connection() as conn:
            await self._ensure_schema(conn)
            await conn.execute(PURGE_CALLS, (now - self._window,))
            await conn.execute(PURGE_TASKS, (now - self._task_idle,))

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(self._window)
            try:
                await self.purge()
            except Exception as exc:
                if self._failure(exc) is None:
                    raise
                log.warning("usage store %s: purge failed (tried again in %ss): %s",
                            self.describe(), self._window, self._failure(exc))

    async def _ensure_schema(self, conn: Any) -> None:
        if self._schema_ready:
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in SCHEMA:
                await conn.execute(statement)
        self._schema_ready = True

    def health(self) -> tuple[bool, str]:
        if self._last_error is not None:
            meanwhile = "counting in this sidecar's memory meanwhile" if self._fallback else "calls are denied"
            return False, f"{self.describe()}: {self._last_error} ({meanwhile})"
        return True, self.describe()

    async def aclose(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            await asyncio.gather(self._purger, return_exceptions=True)
            self._purger = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
        if self._fallback is not None:
            await self._fallback.aclose()
