"""Where escalations live: one interface, SQLite (default) and PostgreSQL (shared).

Every state change is one compare-and-set UPDATE whose WHERE clause names the
state it leaves (and, where it matters, the expiry, the fingerprint):

    claim          ... WHERE id = ? AND state = 'pending'  AND decision_claim IS NULL AND expires_at > now
    approve/deny   ... WHERE id = ? AND state = 'pending'  AND decision_claim = <the claim's token>
    consume        ... WHERE id = ? AND state = 'approved' AND fingerprint = ? AND use_by > now
    expire         ... WHERE (state = 'pending' AND expires_at <= now) OR (state = 'approved' AND use_by <= now)

so when two approvers race (in one sidecar or in many sharing PostgreSQL)
exactly one UPDATE matches the row and the other finds nothing to change.
A human decision takes two: the claim marks the pending row as being decided
(no one else may decide it, and it stays `pending`, so no retry can use it),
the decision's evidence record is written, and only then does the decision
itself set the state; a record that fails drops the claim (`unclaim`) and the
row is pending as before (service.EscalationService._decide). A claim whose
holder died stays until the escalation's TTL expires it: it only ever refuses.
Every UPDATE that takes a row out of `pending` also clears its unredacted
`arguments` (kept only while someone may still decide: docs/escalation.md). A
partial unique index allows one pending escalation per fingerprint, so a
repeated call gets the pending id back instead of a second escalation, even
when two sidecars see it at once.

Durability: every transition is committed durably (SQLite synchronous=FULL,
PostgreSQL's default synchronous commit) before it is answered, except one.
The served sidecar's SQLite store (`sync_new_escalations=False`) commits a
*new* escalation without its own fsync (synchronous=NORMAL for that
transaction: on disk at the next synced commit, lost only to a power loss or
kernel crash, never to the process dying; SQLite docs, "PRAGMA
synchronous"). What makes a new escalation durable is its `escalation`
evidence record, synced before the agent hears of it; after a host crash the
service puts back, from the log, what the store lost (`restore`,
service.EscalationService.start, docs/escalation.md#durability). A create
that expires an overdue escalation is synced like every other transition.

Times are Unix seconds from the deciding sidecar's clock (sidecars keep NTP
time anyway: SVIDs and JWTs depend on it). The store is synchronous
underneath; the async methods run it on a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from sidecar.escalation import APPROVED, EXPIRED, PENDING, STATES, USED, EscalationRecord, StoreError
from sidecar.pgconninfo import where
from sidecar.sqlitedb import connect_durable, database_files

log = logging.getLogger(__name__)

TABLE = "sidecar_escalations"
COLUMNS = (
    "id", "fingerprint", "subject", "subject_source", "delegation", "tool", "server",
    "arguments_digest", "arguments_preview", "task_id", "intent", "call_id", "decision_id",
    "reasons", "policy_revision", "trace_id", "span_id", "created_at", "expires_at", "state",
    "approver", "approver_via", "decided_at", "note", "use_by", "used_at", "used_by_decision",
    "updated_at", "sidecar", "signals", "catalog", "arguments", "agent_seen_at", "agent_waiting_until",
    "restored_at",
)
# Not in COLUMNS (nor in EscalationRecord): only the claim/decide/unclaim compare-and-sets read it.
CLAIM_COLUMN = "decision_claim"
JSON_COLUMNS = ("delegation", "arguments_preview", "reasons", "signals", "catalog", "arguments")
NULLABLE_JSON = ("arguments_preview", "signals", "catalog", "arguments")
# Columns added after the first schema: a store created by an older sidecar gets them on open.
ADDED_COLUMNS = (
    ("signals", "TEXT"),
    ("catalog", "TEXT"),
    ("arguments", "TEXT"),
    ("agent_seen_at", "DOUBLE PRECISION"),
    ("agent_waiting_until", "DOUBLE PRECISION"),
    ("restored_at", "DOUBLE PRECISION"),
    (CLAIM_COLUMN, "TEXT"),
)
SELECT = ", ".join(COLUMNS)
_state_list = ", ".join(f"'{s}'" for s in STATES)

SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        id TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        subject TEXT NOT NULL,
        subject_source TEXT NOT NULL DEFAULT '',
        delegation TEXT NOT NULL DEFAULT '[]',
        tool TEXT NOT NULL,
        server TEXT NOT NULL DEFAULT '',
        arguments_digest TEXT NOT NULL,
        arguments_preview TEXT,
        task_id TEXT NOT NULL DEFAULT '',
        intent TEXT NOT NULL DEFAULT '',
        call_id TEXT NOT NULL DEFAULT '',
        decision_id TEXT NOT NULL DEFAULT '',
        reasons TEXT NOT NULL DEFAULT '[]',
        policy_revision TEXT NOT NULL DEFAULT '',
        trace_id TEXT NOT NULL DEFAULT '',
        span_id TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL CHECK (state IN ({_state_list})),
        approver TEXT NOT NULL DEFAULT '',
        approver_via TEXT NOT NULL DEFAULT '',
        decided_at DOUBLE PRECISION,
        note TEXT NOT NULL DEFAULT '',
        use_by DOUBLE PRECISION,
        used_at DOUBLE PRECISION,
        used_by_decision TEXT NOT NULL DEFAULT '',
        updated_at DOUBLE PRECISION NOT NULL,
        sidecar TEXT NOT NULL DEFAULT '',
        signals TEXT,
        catalog TEXT,
        arguments TEXT,
        agent_seen_at DOUBLE PRECISION,
        agent_waiting_until DOUBLE PRECISION,
        restored_at DOUBLE PRECISION,
        {CLAIM_COLUMN} TEXT
    )""",
    f"CREATE UNIQUE INDEX IF NOT EXISTS {TABLE}_one_pending ON {TABLE} (fingerprint) WHERE state = '{PENDING}'",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_state_created ON {TABLE} (state, created_at)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_updated ON {TABLE} (updated_at)",
)

# Rows that have outlived their state: pending past expires_at, approved past use_by.
_DUE = f"((state = '{PENDING}' AND expires_at <= ?) OR (state = '{APPROVED}' AND use_by <= ?))"
_ACTIVE = f"((state = '{PENDING}' AND expires_at > ?) OR (state = '{APPROVED}' AND use_by > ?))"

SQL = {
    "get": f"SELECT {SELECT} FROM {TABLE} WHERE id = ?",
    "find_active": (
        f"SELECT {SELECT} FROM {TABLE} WHERE fingerprint = ? AND {_ACTIVE} "
        "ORDER BY created_at DESC LIMIT 1"
    ),
    "insert": (
        f"INSERT INTO {TABLE} ({SELECT}) VALUES ({', '.join('?' for _ in COLUMNS)}) "
        f"ON CONFLICT DO NOTHING RETURNING {SELECT}"
    ),
    "expire_fingerprint": (
        f"UPDATE {TABLE} SET state = '{EXPIRED}', arguments = NULL, updated_at = ? WHERE fingerprint = ? AND {_DUE} "
        f"RETURNING {SELECT}"
    ),
    "expire_id": (
        f"UPDATE {TABLE} SET state = '{EXPIRED}', arguments = NULL, updated_at = ? WHERE id = ? AND {_DUE} "
        f"RETURNING {SELECT}"
    ),
    "expire_due": (
        f"UPDATE {TABLE} SET state = '{EXPIRED}', arguments = NULL, updated_at = ? WHERE {_DUE} RETURNING {SELECT}"
    ),
    # A claim changes nothing anyone reads (not updated_at: watchers hear of the decision, not of it).
    "claim": (
        f"UPDATE {TABLE} SET {CLAIM_COLUMN} = ? WHERE id = ? AND state = '{PENDING}' AND {CLAIM_COLUMN} IS NULL "
        f"AND expires_at > ? RETURNING {SELECT}"
    ),
    # No expiry test: the claim was made in time; an expiry or withdrawal since then leaves the row not pending.
    "decide": (
        f"UPDATE {TABLE} SET state = ?, approver = ?, approver_via = ?, note = ?, decided_at = ?, "
        f"use_by = ?, arguments = NULL, {CLAIM_COLUMN} = NULL, updated_at = ? "
        f"WHERE id = ? AND state = '{PENDING}' AND {CLAIM_COLUMN} = ? RETURNING {SELECT}"
    ),
    "unclaim": f"UPDATE {TABLE} SET {CLAIM_COLUMN} = NULL WHERE id = ? AND {CLAIM_COLUMN} = ?",
    "consume": (
        f"UPDATE {TABLE} SET state = '{USED}', used_at = ?, used_by_decision = ?, updated_at = ? "
        f"WHERE id = ? AND state = '{APPROVED}' AND fingerprint = ? AND use_by > ? RETURNING {SELECT}"
    ),
    "release": (
        f"UPDATE {TABLE} SET state = '{APPROVED}', used_at = NULL, used_by_decision = '', updated_at = ? "
        f"WHERE id = ? AND state = '{USED}' AND used_by_decision = ? RETURNING {SELECT}"
    ),
    # An approval can land between the insert and the withdraw (the escalation is listed from its
    # insert on): it goes too, unused, so no call runs on an escalation with no decision record.
    "withdraw": (
        f"UPDATE {TABLE} SET state = '{EXPIRED}', arguments = NULL, updated_at = ? WHERE id = ? "
        f"AND state IN ('{PENDING}', '{APPROVED}') RETURNING {SELECT}"
    ),
    # The agent asked about the call again (a repeat): only the time it was last seen.
    "seen": f"UPDATE {TABLE} SET agent_seen_at = ? WHERE id = ?",
    # An AwaitDecision opens: seen now, waiting until its deadline (or a later one already there).
    "wait_open": (
        f"UPDATE {TABLE} SET agent_seen_at = ?, agent_waiting_until = CASE WHEN agent_waiting_until IS NULL "
        "OR agent_waiting_until < ? THEN ? ELSE agent_waiting_until END WHERE id = ?"
    ),
    # An AwaitDecision ends: seen now; the waiting time is cut back unless a later waiter extended it.
    "wait_close": (
        f"UPDATE {TABLE} SET agent_seen_at = ?, agent_waiting_until = CASE WHEN agent_waiting_until IS NOT NULL "
        "AND agent_waiting_until <= ? THEN ? ELSE agent_waiting_until END WHERE id = ?"
    ),
    "changed_since": f"SELECT {SELECT} FROM {TABLE} WHERE updated_at >= ? ORDER BY updated_at LIMIT ?",
    "latest_change": f"SELECT MAX(updated_at) FROM {TABLE}",
}


class _ExpiryNeedsSync(Exception):
    """A create that would commit unsynced found an overdue escalation to expire: it runs again, synced."""


def _to_row(record: EscalationRecord) -> tuple:
    values = []
    for column in COLUMNS:
        value = getattr(record, column)
        if column in JSON_COLUMNS:
            value = None if value is None and column in NULLABLE_JSON else json.dumps(
                list(value) if isinstance(value, tuple) else value, sort_keys=True, separators=(",", ":")
            )
        values.append(value)
    return tuple(values)


def _from_row(row: Sequence[Any]) -> EscalationRecord:
    values = dict(zip(COLUMNS, row))
    for column in JSON_COLUMNS:
        raw = values[column]
        values[column] = None if raw is None else json.loads(raw)
    values["delegation"] = tuple(values["delegation"] or ())
    values["reasons"] = tuple(values["reasons"] or ())
    for column in ("created_at", "expires_at", "updated_at"):
        values[column] = float(values[column])
    for column in ("decided_at", "use_by", "used_at", "agent_seen_at", "agent_waiting_until", "restored_at"):
        if values[column] is not None:
            values[column] = float(values[column])
    return EscalationRecord(**values)


class EscalationStore(Protocol):
    """The store interface the EscalationService uses. Every method may raise StoreError."""

    name: str
    # False: a new escalation's commit is not fsync'd on its own; `restore` mends a host crash (module docstring)
    syncs_new_escalations: bool
    # The files the store keeps on this host (none for PostgreSQL): a start refused after opening it
    # removes those it created (server._claim).
    files: tuple[Path, ...]

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    def health(self) -> tuple[bool, str]: ...

    async def get(self, escalation_id: str) -> EscalationRecord | None: ...

    async def create(self, record: EscalationRecord, now: float) -> tuple[EscalationRecord, bool, list[EscalationRecord]]:
        """Insert `record` unless the same call (fingerprint) has an active escalation, whose
        agent_seen_at becomes `now` instead (the agent asked again), in the same transaction.

        Returns (the escalation, True if it is new, the escalations of that
        fingerprint that this call found overdue and expired).
        """
        ...

    async def list(self, *, state: str = "", subject: str = "", tool: str = "", limit: int = 100) -> list[EscalationRecord]: ...

    async def claim(self, escalation_id: str, token: str, now: float) -> EscalationRecord | None:
        """Mark a pending, unexpired, unclaimed escalation as being decided under `token` (its state stays
        pending); None when it was not all three."""
        ...

    async def decide(self, escalation_id: str, token: str, state: str, *, approver: str, via: str, note: str,
                     now: float, use_by: float | None) -> EscalationRecord | None:
        """pending → approved|denied, only while still pending under the claim `token`; None when it was not
        (expired or withdrawn since the claim)."""
        ...

    async def unclaim(self, escalation_id: str, token: str) -> None:
        """Drop the claim `token` (its decision could not be recorded): the escalation can be decided again."""
        ...

    async def consume(self, escalation_id: str, fingerprint: str, now: float, decision_id: str) -> EscalationRecord | None:
        """approved → used, only for that fingerprint and inside the use window; None otherwise."""
        ...

    async def release(self, escalation_id: str, decision_id: str, now: float) -> EscalationRecord | None:
        """used → approved again, only when `decision_id` used it: the allow that used it could not be
        recorded, so the call did not run. None when it was not so used."""
        ...

    async def expire(self, now: float, escalation_id: str | None = None) -> list[EscalationRecord]:
        """Overdue pending/approved → expired (one id, or all); returns the rows this call changed."""
        ...

    async def withdraw(self, escalation_id: str, now: float) -> EscalationRecord | None:
        """pending or approved (unused) → expired at once: an escalation whose decision could not be
        recorded. None when it was neither (denied, expired, used)."""
        ...

    async def changed_since(self, since: float, limit: int = 500) -> list[EscalationRecord]: ...

    async def latest_change(self) -> float | None:
        """The newest `updated_at` in the store (Unix seconds), None when it is empty."""
        ...

    async def restore(self, records: Sequence[EscalationRecord]) -> list[EscalationRecord]:
        """Insert those of `records` whose id the store lacks, in one synced transaction (a record
        that conflicts with a stored one, by id or as a second pending escalation of its
        fingerprint, is skipped); returns the ones inserted."""
        ...

    async def agent_wait(self, escalation_id: str, now: float, *, opened_until: float | None = None,
                         closed_until: float | None = None, then_until: float | None = None) -> None:
        """An AwaitDecision opened (waiting until `opened_until`, or a later time already stored) or
        closed (a stored time up to `closed_until` becomes `then_until`); agent_seen_at = now either way."""
        ...


class _SqlStore:
    """The shared logic; subclasses provide `_transaction(fn)` running fn(execute) atomically."""

    name = "sql"
    placeholder = "?"
    syncs_new_escalations = True

    def __init__(self) -> None:
        self._last_error: str | None = None

    def _sql(self, key: str) -> str:
        text = SQL[key]
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def _run_sync(self, fn: Callable[[Callable[..., list]], Any], transaction: bool = False, synced: bool = True) -> Any:
        """Run fn(execute), in one transaction if `transaction`, its commit fsync'd unless `synced` is False
        (a store that cannot commit without a sync ignores it)."""
        raise NotImplementedError

    async def _run(self, fn: Callable[[Callable[..., list]], Any], transaction: bool = False, synced: bool = True) -> Any:
        try:
            result = await asyncio.to_thread(self._run_sync, fn, transaction, synced)
        except StoreError as exc:
            self._last_error = str(exc)
            raise
        self._last_error = None
        return result

    def health(self) -> tuple[bool, str]:
        if self._last_error:
            return False, f"{self.describe()}: {self._last_error}"
        return True, self.describe()

    def describe(self) -> str:
        return self.name

    async def get(self, escalation_id: str) -> EscalationRecord | None:
        rows = await self._run(lambda q: q(self._sql("get"), (escalation_id,)))
        return _from_row(rows[0]) if rows else None

    async def create(self, record: EscalationRecord, now: float):
        def work(q, synced: bool):
            expired = [_from_row(r) for r in q(self._sql("expire_fingerprint"), (now, record.fingerprint, now, now))]
            if expired and not synced:
                raise _ExpiryNeedsSync  # rolled back; run again, synced (below)
            for attempt in range(2):
                active = q(self._sql("find_active"), (record.fingerprint, now, now))
                if active:
                    found = _from_row(active[0])
                    q(self._sql("seen"), (now, found.id))
                    return replace(found, agent_seen_at=now), False, expired
                if attempt == 0:
                    inserted = q(self._sql("insert"), _to_row(record))
                    if inserted:
                        return _from_row(inserted[0]), True, expired
            raise StoreError("could not create or find the escalation (concurrent change); try again")

        if not self.syncs_new_escalations:
            try:
                return await self._run(lambda q: work(q, False), transaction=True, synced=False)
            except _ExpiryNeedsSync:
                pass
        return await self._run(lambda q: work(q, True), transaction=True)

    async def list(self, *, state: str = "", subject: str = "", tool: str = "", limit: int = 100):
        where, params = [], []
        for column, value in (("state", state), ("subject", subject), ("tool", tool)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT {SELECT} FROM {TABLE}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id LIMIT ?"
        params.append(max(1, min(int(limit), 1000)))
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        rows = await self._run(lambda q: q(sql, tuple(params)))
        return [_from_row(r) for r in rows]

    async def claim(self, escalation_id, token, now):
        rows = await self._run(lambda q: q(self._sql("claim"), (token, escalation_id, now)))
        return _from_row(rows[0]) if rows else None

    async def decide(self, escalation_id, token, state, *, approver, via, note, now, use_by):
        if state not in (APPROVED, "denied"):
            raise ValueError(f"decide: state must be approved or denied, not {state!r}")
        rows = await self._run(
            lambda q: q(self._sql("decide"), (state, approver, via, note, now, use_by, now, escalation_id, token))
        )
        return _from_row(rows[0]) if rows else None

    async def unclaim(self, escalation_id, token):
        await self._run(lambda q: q(self._sql("unclaim"), (escalation_id, token)))

    async def consume(self, escalation_id, fingerprint, now, decision_id):
        rows = await self._run(
            lambda q: q(self._sql("consume"), (now, decision_id, now, escalation_id, fingerprint, now))
        )
        return _from_row(rows[0]) if rows else None

    async def release(self, escalation_id, decision_id, now):
        rows = await self._run(lambda q: q(self._sql("release"), (now, escalation_id, decision_id)))
        return _from_row(rows[0]) if rows else None

    async def expire(self, now, escalation_id=None):
        if escalation_id is None:
            rows = await self._run(lambda q: q(self._sql("expire_due"), (now, now, now)))
        else:
            rows = await self._run(lambda q: q(self._sql("expire_id"), (now, escalation_id, now, now)))
        return [_from_row(r) for r in rows]

    async def withdraw(self, escalation_id, now):
        rows = await self._run(lambda q: q(self._sql("withdraw"), (now, escalation_id)))
        return _from_row(rows[0]) if rows else None

    async def changed_since(self, since, limit=500):
        rows = await self._run(lambda q: q(self._sql("changed_since"), (since, limit)))
        return [_from_row(r) for r in rows]

    async def latest_change(self):
        rows = await self._run(lambda q: q(self._sql("latest_change")))
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    async def restore(self, records):
        def work(q):
            return [_from_row(r) for record in records for r in q(self._sql("insert"), _to_row(record))]

        return await self._run(work, transaction=True)

    async def agent_wait(self, escalation_id, now, *, opened_until=None, closed_until=None, then_until=None):
        if opened_until is not None:
            params = (now, opened_until, opened_until, escalation_id)
            await self._run(lambda q: q(self._sql("wait_open"), params))
        else:
            params = (now, closed_until, then_until, escalation_id)
            await self._run(lambda q: q(self._sql("wait_close"), params))


class SqliteStore(_SqlStore):
    """A SQLite file in WAL mode, synchronous=FULL: a decided approval survives a crash. With
    `sync_new_escalations=False` a new escalation is committed with synchronous=NORMAL, for an
    owner that mends the store from the evidence log at start (module docstring)."""

    name = "sqlite"

    def __init__(self, path: str | Path, *, timeout_ms: int = 5000, sync_new_escalations: bool = True):
        super().__init__()
        self.syncs_new_escalations = sync_new_escalations
        self.path = Path(path)
        self.files = database_files(self.path)
        self._timeout = timeout_ms / 1000
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"sqlite {self.path}"

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        try:
            conn = connect_durable(self.path, self._timeout)
            for statement in SCHEMA:
                conn.execute(statement)
            present = {row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})")}
            for column, kind in ADDED_COLUMNS:
                if column not in present:
                    conn.execute(f"ALTER TABLE {TABLE} ADD COLUMN {column} {kind}")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the escalation store {self.path}: {exc}") from None
        self._conn = conn

    async def aclose(self) -> None:
        def close_connection() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.to_thread(close_connection)

    def _run_sync(self, fn, transaction=False, synced=True):
        with self._lock:
            if self._conn is None:
                raise StoreError("the escalation store is closed")
            conn = self._conn

            def execute(sql: str, params: Sequence[Any] = ()) -> list:
                return conn.execute(sql, tuple(params)).fetchall()

            try:
                if not transaction:
                    return fn(execute)
                if not synced:  # the level cannot change inside a transaction
                    conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("BEGIN IMMEDIATE")
                result = fn(execute)
                conn.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite: {exc}") from None
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if not synced:
                    conn.execute("PRAGMA synchronous=FULL")  # outside a transaction, this cannot fail


class PostgresStore(_SqlStore):
    """PostgreSQL shared by many sidecars, through a psycopg connection pool."""

    name = "postgres"
    placeholder = "%s"
    files = ()

    def __init__(self, dsn: str, *, timeout_ms: int = 5000, pool_size: int = 4):
        super().__init__()
        self.dsn = dsn
        self._where = f"postgres {where(dsn)}"  # the PG* variables are the process's: read once
        self._timeout_ms = timeout_ms
        self._pool_size = pool_size
        self._pool: Any = None
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    def describe(self) -> str:
        return self._where

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - dependency is declared
            raise StoreError(f"escalation.store postgres needs psycopg and psycopg-pool: {exc}") from None
        self._pool = ConnectionPool(
            self.dsn,
            min_size=1,
            max_size=self._pool_size,
            open=False,
            timeout=self._timeout_ms / 1000,
            kwargs={"autocommit": True, "options": f"-c statement_timeout={self._timeout_ms}",
                    "connect_timeout": max(1, self._timeout_ms // 1000)},
            name="sidecar-escalations",
        )
        self._pool.open(wait=False)
        try:
            self._run_sync(lambda q: None)
        except StoreError as exc:
            # Not fatal: the store is retried on every use and health says why meanwhile.
            self._last_error = str(exc)
            log.warning("escalation store not reachable yet: %s", exc)

    def _ensure_schema(self, conn) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(7270120501)")
                for statement in SCHEMA:
                    conn.execute(statement)
                for column, kind in ADDED_COLUMNS:
                    conn.execute(f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS {column} {kind}")
            self._schema_ready = True

    async def aclose(self) -> None:
        if self._pool is not None:
            await asyncio.to_thread(self._pool.close)
            self._pool = None

    def _run_sync(self, fn, transaction=False, synced=True):  # PostgreSQL commits synchronously
        import psycopg
        import psycopg_pool

        if self._pool is None:
            raise StoreError("the escalation store is closed")
        try:
            with self._pool.connection() as conn:
                self._ensure_schema(conn)

                def execute(sql: str, params: Sequence[Any] = ()) -> list:
                    cursor = conn.execute(sql, tuple(params))
                    return cursor.fetchall() if cursor.description is not None else []

                if not transaction:
                    return fn(execute)
                with conn.transaction():
                    return fn(execute)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreError(f"postgres: {message}") from None


def open_store(config: Any, default_dir: str | Path = ".", *, sync_new_escalations: bool = True) -> EscalationStore:
    """The store `escalation.store` names (not opened yet); SQLite defaults to default_dir/escalations.db.
    `sync_new_escalations=False`: SQLite commits new escalations without their own sync (PostgreSQL
    always syncs); the caller must then mend it from the evidence log (EscalationService evidence_reader)."""
    if config.store == "postgres":
        return PostgresStore(config.dsn, timeout_ms=config.store_timeout_ms, pool_size=config.pool_size)
    return SqliteStore(config.path or Path(default_dir) / "escalations.db", timeout_ms=config.store_timeout_ms,
                       sync_new_escalations=sync_new_escalations)
