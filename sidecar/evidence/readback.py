"""Reading the evidence log back, newest first: what a store recovers from after a host crash.

The escalation store commits a new escalation without its own fsync (its record in this log,
synced before the agent hears of it, is what makes it durable: docs/escalation.md#durability).
A power loss or kernel crash can then take the store's last commits while the log keeps their
records; at the next start the store is mended from here.

Records are read from the end of the newest file backwards, file after file, and reading stops
at the first record logged (`logged_at`) before `since`, so a start reads only the window it
needs however long the log is. Each line in that window is parsed to read its own top-level
`logged_at`: a record holds an agent's values (its signals and arguments in `input`, which sorts
before `logged_at`), and a search of the raw line for `"logged_at":"…"` found an agent's key
`logged_at` first, so one call could end the window early (a host crash then lost for good the
escalations logged before that call). `match` sees each raw line and picks the records returned.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import orjson

from sidecar.evidence.log import list_log_files
from sidecar.evidence.records import parse_rfc3339

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024


def records_since(directory: str | Path, since: float, match: Callable[[bytes], bool]) -> list[dict]:
    """The records of the log in `directory` logged at or after `since` (Unix seconds) whose line
    satisfies `match`, newest first. A line that is not a JSON object, or has no readable
    `logged_at`, is skipped (`evidence verify` is the tool that judges the log). Raises OSError
    when a file cannot be read."""
    found: list[dict] = []
    for _, path in reversed(list_log_files(directory)):
        for line in _lines_backwards(path):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            logged_at = _logged_at(record)
            if logged_at is None:
                continue
            if logged_at < since:
                return found
            if match(line):
                found.append(record)
    return found


def _logged_at(record: dict) -> float | None:
    """The record's own `logged_at` (its top-level field) as Unix seconds, None when unreadable."""
    value = record.get("logged_at")
    if not isinstance(value, str):
        return None
    try:
        return parse_rfc3339(value).timestamp()
    except ValueError:
        return None


def _lines_backwards(path: Path) -> Iterator[bytes]:
    """The complete lines of `path`, last first, read in CHUNK-sized pieces from its end."""
    with open(path, "rb") as f:
        end = f.seek(0, 2)
        rest = b""  # the start of a line whose beginning lies before the piece read last
        while end > 0:
            start = max(0, end - CHUNK)
            f.seek(start)
            piece = f.read(end - start) + rest
            end = start
            lines = piece.split(b"\n")
            rest = lines[0] if start > 0 else b""
            for line in reversed(lines if start == 0 else lines[1:]):
                if line:
                    yield line
