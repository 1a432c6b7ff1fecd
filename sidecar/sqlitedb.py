"""SQLite files the way the sidecar's stores keep them (escalations.db, tasks.db).

WAL mode with synchronous=FULL: a committed transaction is on disk before the
commit returns, and a reader never waits for a writer (SQLite docs, "Write-Ahead
Logging" and "PRAGMA synchronous").
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect_durable(path: Path, timeout_seconds: float) -> sqlite3.Connection:
    """A connection to `path` (created with its directory) in WAL mode, synchronous=FULL, autocommit
    (callers BEGIN and COMMIT), usable from any one thread at a time; waits up to `timeout_seconds`
    for another connection's lock. Raises sqlite3.Error or OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=timeout_seconds, isolation_level=None, check_same_thread=False)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"could not switch to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(timeout_seconds * 1000)}")
    except sqlite3.Error:
        conn.close()
        raise
    return conn
