"""Reading the evidence log back, newest first: what a store recovers from after a host crash.

The escalation store commits a new escalation without its own fsync (its record in this log,
synced before the agent hears of it, is what makes it durable: docs/escalation.md#durability).
A power loss or kernel crash can then take the store's last commits while the log keeps their
records; at the next start the store is mended from here.

Records are read from the end of the newest file backwards, file after file, and reading stops
at the first record logged (`logged_at`) before `since`, so a start reads only the window it
needs however long the log is. `match` sees each raw line before it is parsed, so a caller that
wants a few kinds parses only those.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterator

from sidecar.evidence.log import list_log_files
from sidecar.evidence.records import parse_rfc3339

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
_LOGGED_AT = re.compile(rb'"logged_at":"([^"]+)"')


def records_since(directory: str | Path, since: float, match: Callable[[bytes], bool]) -> list[dict]:
    """The records of the log in `directory` logged at or after `since` (Unix seconds) whose line
    satisfies `match`, newest first. A line that is not a JSON object, or has no readable
    `logged_at`, is skipped (`evidence verify` is the tool that judges the log). Raises OSError
    when a file cannot be read."""
    found: list[dict] = []
    for _, path in reversed(list_log_files(directory)):
        for line in _lines_backwards(path):
            logged_at = _logged_at(line)
            if logged_at is None:
                continue
            if logged_at < since:
                return found
            if not match(line):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                found.append(record)
    return found


def _logged_at(line: bytes) -> float | None:
    found = _LOGGED_AT.search(line)
    if found is None:
        return None
    try:
        return parse_rfc3339(found.group(1).decode()).timestamp()
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
