"""Where task state outlives the sidecar process: a SQLite file, `tasks.db` in evidence.dir.

    async with TaskStore(Path("var/evidence/tasks.db")) as store:
        task, created = await store.open_task(StoredTask("t-1", owner, caller, first_call, time.time()))
        await store.end_task(replace(task, ending=StoredEnding(why, ended_at, trace_id, fields)))
        await store.ending_recorded("t-1", receipt)        # its task_end record is in the evidence log
        await store.calls_seen([("t-1", time.time())])     # last call times, written in batches
        restored = await store.restore(endings, read_at)   # endings read back from the evidence log

The registry (tasks.py) keeps recent tasks in memory and asks the store for any
other: so a restart, or a task that left memory, never brings an ended task back
into use or hands an open one to another agent.

Durability: WAL mode with synchronous=FULL (sqlitedb.py), so an opening or an
ending is on disk before `open_task` or `end_task` returns, as the decision
record of the same call is before the agent's answer. The last call times
(`calls_seen`) are written in batches and may lag; read back after a restart
they make a task look idle for longer than it was, so an idle timeout can come
early after a restart, never late.

Mended from the evidence log: a store deleted, emptied or put back from an older
backup holds fewer endings than the log's `task_end` records. At start the
registry reads the log back from shortly before the store's newest change
(`latest_change`: its newest call, ending or read-back) and hands `restore`
the endings it found; `restore` stores those the store lacks and stamps the
read-back, so the next start reads only what came after it.

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
from typing import Any, Callable, Iterable, Sequence

from sidecar.evidence import Receipt
from sidecar.evidence.records import parse_rfc3339
from sidecar.sqlitedb import connect_durable, database_files

SCHEMA = ("""
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
""", """
CREATE TABLE IF NOT EXISTS evidence_read (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    read_at REAL NOT NULL
)
""")  # evidence_read: when the store last took in every ending the evidence log held (`restore`)
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
        self.files = database_files(self.path)  # what a refused start removes when it created them (server._claim)
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
            for statement in SCHEMA:
                conn.execute(statement)
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

    async def latest_change(self) -> float | None:
        """The newest time the store holds (Unix seconds): a call, an ending, or the last `restore`;
        None for a store that holds none (new, emptied, or never used)."""

        def work(conn: sqlite3.Connection) -> float | None:
            last_call, ended_at = conn.execute("SELECT MAX(last_call_at), MAX(ended_at) FROM tasks").fetchone()
            (read_at,) = conn.execute("SELECT MAX(read_at) FROM evidence_read").fetchone()
            # ended_at is RFC 3339 with a fixed width (records.rfc3339), so its text order is time order
            times = [t for t in (last_call, read_at) if t is not None]
            if ended_at is not None:
                times.append(parse_rfc3339(ended_at).timestamp())
            return max(times) if times else None

        return await self._run(work)

    async def restore(self, endings: Sequence[StoredTask], read_at: float) -> list[StoredTask]:
        """Store the endings (read back from the evidence log, each with its receipt) of the tasks the
        store holds no ending for, and stamp `read_at`, the time the log was read from its end, as
        the store's newest change; one transaction. A task stored open is ended with the log's
        owner and caller (its first ending's); a stored ending is never replaced. Returns those stored."""

        def work(conn: sqlite3.Connection) -> list[StoredTask]:
            stored = []
            for task in endings:
                ending = task.ending
                assert ending is not None and ending.receipt is not None
                first_trace, first_span = task.first_call or (None, None)
                changed = conn.execute(
                    "INSERT INTO tasks (task_id, owner, caller, first_trace_id, first_span_id, last_call_at, ended_at, "
                    "why, ended_trace_id, end_seq, end_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (task_id) DO UPDATE SET owner = excluded.owner, caller = excluded.caller, "
                    "ended_at = excluded.ended_at, why = excluded.why, ended_trace_id = excluded.ended_trace_id, "
                    "end_seq = excluded.end_seq, end_hash = excluded.end_hash WHERE tasks.ended_at IS NULL",
                    (task.task_id, task.owner, json.dumps(task.caller), first_trace, first_span, task.last_call_at,
                     ending.ended_at, ending.why, ending.trace_id, ending.receipt.seq, ending.receipt.hash),
                ).rowcount
                if changed:
                    stored.append(task)
            conn.execute("INSERT INTO evidence_read (id, read_at) VALUES (1, ?) "
                         "ON CONFLICT (id) DO UPDATE SET read_at = excluded.read_at", (read_at,))
            return stored

        return await self._run(work)
