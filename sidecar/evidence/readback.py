"""Reading the evidence log back, newest first: what a store recovers from when it lost commits.

The escalation store commits a new escalation without its own fsync (its record in this log,
synced before the agent hears of it, is what makes it durable: docs/escalation.md#durability).
A power loss or kernel crash can then take the store's last commits while the log keeps their
records; at the next start the store is mended from here.

Records are read from the end of the newest file backwards, file after file, and reading stops
at the first record logged (`logged_at`) before `since`, so a start reads only the window it
needs however long the log is. Each record's time is its own top-level `logged_at`: a record
holds an agent's values (its signals and arguments in `input`, which sorts before `logged_at`),
and taking the first `"logged_at":"…"` of the raw line read an agent's key `logged_at`, so one
call could end the window early (a host crash then lost for good the escalations logged before
that call). A line with that key more than once is parsed to tell (`_line_time`). `match` sees
each raw line before it is parsed, so a caller that wants a few kinds parses only those.
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
# How far before a store's newest change the log is read back at start: more than a transaction
# can wait for the store's lock between taking its time and committing.
RESTORE_MARGIN_SECONDS = 30.0
_LOGGED_AT_KEY = b'"logged_at":"'


def restore_since(latest_change: float | None, now: float, oldest: float) -> float:
    """Where a start reads the log back from (Unix seconds): RESTORE_MARGIN_SECONDS before the store's
    `latest_change`, never before `oldest` (what the store could still need: an escalation's TTL;
    0, the whole log, for task endings). No change at all (an empty or new store): `oldest`. A
    change stamped after `now` (a clock that was ahead) counts as `now`, so it cannot hide the log."""
    if latest_change is None:
        return oldest
    return max(oldest, min(latest_change, now) - RESTORE_MARGIN_SECONDS)


def records_since(directory: str | Path, since: float, match: Callable[[bytes], bool]) -> list[dict]:
    """The records of the log in `directory` logged at or after `since` (Unix seconds) whose line
    satisfies `match`, newest first. A line that is not a JSON object, or has no readable
    `logged_at`, is skipped (`evidence verify` is the tool that judges the log). Raises OSError
    when a file cannot be read."""
    found: list[dict] = []
    for _, path in reversed(list_log_files(directory)):
        for line in _lines_backwards(path):
            logged_at, record = _line_time(line)
            if logged_at is None:
                continue
            if logged_at < since:
                return found
            if not match(line):
                continue
            if record is None:
                record = _parsed(line)
            if record is not None:
                found.append(record)
    return found


def _line_time(line: bytes) -> tuple[float | None, dict | None]:
    """(the record's own logged_at, the record when it had to be parsed to find it).

    A sealed record has exactly one top-level `logged_at`. Inside a JSON string a quote is escaped,
    so the bytes `"logged_at":"` occur only as a key: when they occur once, that is the record's
    own field, read without parsing the line. More than once, an object the record holds (an
    agent's signals or arguments) has a key `logged_at` too, and only parsing tells which is whose."""
    if line.count(_LOGGED_AT_KEY) == 1:
        start = line.index(_LOGGED_AT_KEY) + len(_LOGGED_AT_KEY)
        end = line.find(b'"', start)
        return (_time(line[start:end].decode("utf-8", "replace")) if end > 0 else None), None
    record = _parsed(line)
    return (_time(record.get("logged_at")) if record is not None else None), record


def _parsed(line: bytes) -> dict | None:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _time(value: object) -> float | None:
    """An RFC 3339 time as Unix seconds, None when it is not one."""
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
