"""Where a libpq connection string goes, read as libpq reads it: its own keywords over the PG* variables.

    effective_conninfo("dbname=app")       # {"host": "db.example", "dbname": "app", ...} with PGHOST=db.example
    where("dbname=app")                     # "db.example:5432/app", for logs and health details

The config's plaintext rule (config._validate_dsn) and the stores' messages read the same
values, so a message never names another server than the one the check judged. Never the
password: `where` gives only host, port and database.
"""

from __future__ import annotations

from psycopg import pq


def effective_conninfo(dsn: str) -> dict[str, str]:
    """libpq's keywords for `dsn` with the PG* variables and libpq's defaults beneath (libpq docs, 34.15
    "Environment Variables"); ValueError when libpq cannot read `dsn` (its message is not kept: it may
    quote the string, password included)."""
    try:
        given = {o.keyword.decode(): o.val.decode() for o in pq.Conninfo.parse(dsn.encode()) if o.val}
    except Exception:
        raise ValueError("not a libpq connection string or postgresql:// URL") from None
    defaults = {o.keyword.decode(): o.val.decode() for o in pq.Conninfo.get_defaults() if o.val}
    return {**defaults, **given}


def where(dsn: str) -> str:
    """`host:port/dbname` of the server `dsn` reaches (hostaddr when no host is named, libpq's default
    socket when neither is; the database defaults to the user, as in libpq), or "(unreadable connection
    string)"."""
    try:
        info = effective_conninfo(dsn)
    except ValueError:
        return "(unreadable connection string)"
    host = info.get("host") or info.get("hostaddr") or "default socket"
    return f"{host}:{info.get('port') or '5432'}/{info.get('dbname') or info.get('user', '')}"
