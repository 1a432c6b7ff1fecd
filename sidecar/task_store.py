"""Where task state outlives the sidecar process: a SQLite file, `tasks.db` in evidence.dir.

    async with TaskStore(Path("var/evidence/tasks.db")) as store:
        task, created = await store.open_task(StoredTask("t-1", owner, caller, first_call, time.time()))
        await store.end_task(replace(task, ending=StoredEnding(why, ended_at, trace_id, fields)))
        await store.ending_recorded("t-1", receipt)        # its task_end record is in the evidence log
        await store.calls_seen([("t-1", time.time())])     # last call times, written in batches

The registry (tasks.py) keeps recent tasks in memory and asks the store for any
other: so a restart, or a task that left memory, never brings an ended task back
into use or hands an open one to another agent.

Durability: WAL mode with synchronous=FULL (sqlitedb.py), so an opening or an
ending is on disk before `open_task` or `end_task` returns, as the decision
record of the same call is before the agent's answer. The last call times
(`calls_seen`) are written in batches and may lag; read back after a restart
they make a task look idle for longer than it was, so an idle timeout can come
early after a restart, never late.

Errors: every method raises TaskStoreError (a locked, unreadable or full
database); the registry then denies the call `task_state_unavailable`.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sidecar.evidence import Receipt
from sidecar.sqlitedb import connect_durable

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    caller TEXT NOT NULL,
    first_trace_id TEXT,
    first_span_id TEXT,
    last_call_at REAL NOT NULL,
    ended_at TEXT,
    why TEXT,
    ended_trace_id TEXT,
    end_record TEXT,
    end_seq INTEGER,
    end_hash TEXT
)
"""
COLUMNS = ("task_id, owner, caller, first_trace_id, first_span_id, last_call_at, ended_at, why, ended_trace_id, "
           "end_record, end_seq, end_hash")


class TaskStoreError(Exception):
    """The task store could not be read or written (the message says why)."""


@dataclass(frozen=True)
class StoredEnding:
    why: str  # "was ended by EndTask at …" | "ended after N s without calls (idle timeout) at …"
    ended_at: str  # RFC 3339, UTC
    trace_id: str  # the task_end record's trace
    end_record: dict | None = None  # its task_end fields while they are not in the evidence log
    receipt: Receipt | None = None  # where its task_end record is, once written


@dataclass(frozen=True)
class StoredTask:
    task_id: str
    owner: str  # SPIFFE ID of the agent the task belongs to
    caller: dict  # {"subject": {...}, "delegation": [...]} of its first call (or of the EndTask that ended it unseen)
    first_call: tuple[str, str] | None  # (trace_id, span_id) of its first call; None when it ended unseen
    last_call_at: float  # wall clock, seconds since the epoch
    ending: StoredEnding | None = None


def _from_row(row: tuple) -> StoredTask:
    (task_id, owner, caller, first_trace, first_span, last_call_at, ended_at, why, ended_trace, end_record,
     end_seq, end_hash) = row
    ending = None
    if ended_at is not None:
        receipt = Receipt(end_seq, end_hash) if end_seq is not None else None
        ending = StoredEnding(why, ended_at, ended_trace, json.loads(end_record) if end_record else None, receipt)
    first_call = (first_trace, first_span) if first_trace else None
    return StoredTask(task_id, owner, json.loads(caller), first_call, last_call_at, ending)


class TaskStore:
    """One SQLite connection, used from worker threads one statement group at a time."""

    def __init__(self, path: str | Path, *, timeout_ms: int = 5000):
        self.path = Path(path)
        self._timeout = timeout_ms / 1000
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._last_error: str | None = None  # the last operation's failure, cleared by the next success

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    async def __aenter__(self) -> "TaskStore":
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _open_sync(self) -> None:
        try:
            conn = connect_durable(self.path, self._timeout)
            conn.execute(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise TaskStoreError(f"cannot open the task store {self.path}: {exc}") from None
        self._conn = conn

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.to_thread(close)

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def health(self) -> tuple[bool, str]:
        """(ok, detail) for the health check: not ok while the last operation failed."""
        if self._last_error:
            return False, self._last_error
        return True, f"task store {self.describe()}"

    async def _run(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            result = await asyncio.to_thread(self._run_sync, work)
        except TaskStoreError as exc:
            self._last_error = str(exc)
            raise
        self._last_error = None
        return result

    def _run_sync(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._lock:
            if self._conn is None:
                raise TaskStoreError(f"the task store {self.path} is closed")
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                result = work(conn)
                conn.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise TaskStoreError(f"task store {self.path}: {exc}") from None
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    async def open_task(self, task: StoredTask) -> tuple[StoredTask, bool]:
        """The stored task under `task.task_id`, or `task` stored now: (task, created)."""

        def work(conn: sqlite3.Connection) -> tuple[StoredTask, bool]:
            row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE task_id = ?", (task.task_id,)).fetchone()
            if row is not None:
                return _from_row(row), False
            first_trace, first_span = task.first_call or (None, None)
            conn.execute(
                "INSERT INTO tasks (task_id, owner, caller, first_trace_id, first_span_id, last_call_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (task.task_id, task.owner, json.dumps(task.caller), first_trace, first_span, task.last_call_at),
            )
            return task, True

        return await self._run(work)

    async def get(self, task_id: str) -> StoredTask | None:
        def work(conn: sqlite3.Connection) -> StoredTask | None:
            row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            return _from_row(row) if row is not None else None

        return await self._run(work)

    async def end_task(self, task: StoredTask) -> None:
        """Store `task.ending` (a task never seen before is stored with it); a first ending is never replaced."""
        ending = task.ending
        assert ending is not None
        first_trace, first_span = task.first_call or (None, None)
        record = json.dumps(ending.end_record) if ending.end_record is not None else None

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO tasks (task_id, owner, caller, first_trace_id, first_span_id, last_call_at, ended_at, "
                "why, ended_trace_id, end_record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (task_id) DO UPDATE SET ended_at = excluded.ended_at, why = excluded.why, "
                "ended_trace_id = excluded.ended_trace_id, end_record = excluded.end_record "
                "WHERE tasks.ended_at IS NULL",
                (task.task_id, task.owner, json.dumps(task.caller), first_trace, first_span, task.last_call_at,
                 ending.ended_at, ending.why, ending.trace_id, record),
            )

        await self._run(work)

    async def ending_recorded(self, task_id: str, receipt: Receipt) -> None:
        """The task's task_end record is in the evidence log at `receipt`: its fields need not be kept."""
        await self._run(lambda conn: conn.execute(
            "UPDATE tasks SET end_record = NULL, end_seq = ?, end_hash = ? WHERE task_id = ?",
            (receipt.seq, receipt.hash, task_id),
        ))

    async def calls_seen(self, seen: Iterable[tuple[str, float]]) -> None:
        """Move open tasks' last call times forward: (task_id, wall clock seconds) pairs, in one transaction."""
        rows = [(at, task_id, at) for task_id, at in seen]
        if rows:
            await self._run(lambda conn: conn.executemany(
                "UPDATE tasks SET last_call_at = ? WHERE task_id = ? AND ended_at IS NULL AND last_call_at < ?", rows
            ))
