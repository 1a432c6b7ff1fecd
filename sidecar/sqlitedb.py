"""SQLite files the way the sidecar's stores keep them (escalations.db, tasks.db).

WAL mode with synchronous=FULL: a committed transaction is on disk before the
commit returns, and a reader never waits for a writer (SQLite docs, "Write-Ahead
Logging" and "PRAGMA synchronous").
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

# Like the evidence log's files: owner read-write, group read, nobody else. escalations.db holds
# the arguments of pending calls in full (secrets too: they are what the approver reads), which
# the evidence log itself never keeps in clear.
FILE_MODE = 0o640


def database_files(path: Path) -> tuple[Path, Path, Path]:
    """The files one database is in WAL mode: the file, its write-ahead log and that log's index
    (a copy, a removal or a mode takes all three)."""
    return path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def _private(path: Path) -> None:
    """Create `path` with FILE_MODE (SQLite gives its -wal and -shm files the database's mode), and take
    the bits for others off the database and those files when an earlier start left them readable."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), FILE_MODE))
    for name in database_files(path):
        try:
            mode = name.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if mode & 0o007:
            os.chmod(name, mode & ~0o007)


def connect_durable(path: Path, timeout_seconds: float) -> sqlite3.Connection:
    """A connection to `path` (created with its directory) in WAL mode, synchronous=FULL, autocommit
    (callers BEGIN and COMMIT), usable from any one thread at a time; waits up to `timeout_seconds`
    for another connection's lock. Raises sqlite3.Error or OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _private(path)
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
