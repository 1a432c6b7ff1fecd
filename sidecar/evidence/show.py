"""`agent-sidecar evidence show DIR`: find records, print them as a table or JSON lines.

What a person reads cannot act on the terminal (sidecar/display.py): in the table a cell holding
control or invisible characters is shown escaped and starts with [!]; `--json` prints each record
with those characters as JSON escapes (the same JSON value as the log line; other bytes unchanged).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, TextIO

from sidecar.display import FLAG, NOTICE, cell, json_safe
from sidecar.evidence.log import list_log_files
from sidecar.evidence.records import parse_rfc3339, reason_code

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """An RFC 3339 time, or a duration back from now: 30s, 15m, 2h, 7d."""
    match = _DURATION.match(value.strip())
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        seconds = amount * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
        return (now or datetime.now(timezone.utc)) - timedelta(seconds=seconds)
    try:
        return parse_rfc3339(value)
    except ValueError:
        raise ValueError(f"--since: {value!r} is neither an RFC 3339 time nor a duration like 15m") from None


@dataclass
class Filter:
    tool: str = ""
    subject: str = ""
    outcome: str = ""
    since: datetime | None = None
    decision_id: str = ""
    kind: str = ""

    def matches(self, record: dict) -> bool:
        if self.kind and record.get("kind") != self.kind:
            return False
        if self.tool and record.get("tool") != self.tool:
            return False
        if self.outcome and record.get("outcome") != self.outcome:
            return False
        if self.decision_id and record.get("decision_id") != self.decision_id:
            return False
        if self.subject:
            subject = record.get("subject")
            spiffe_id = subject.get("spiffe_id", "") if isinstance(subject, dict) else ""
            if not (spiffe_id == self.subject or spiffe_id.startswith(self.subject.rstrip("/") + "/")):
                return False
        if self.since is not None:
            stamp = when(record)
            try:
                if parse_rfc3339(str(stamp)) < self.since:
                    return False
            except ValueError:
                return False
        return True


def when(record: dict) -> str:
    """When what the record tells happened: `time`, a task_end's `ended_at`, else when it was logged."""
    return record.get("time") or record.get("ended_at") or record.get("logged_at") or ""


def iter_lines(directory: str | Path) -> Iterator[tuple[bytes, dict]]:
    for _, path in list_log_files(directory):
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield line.rstrip(b"\n"), record


def show(directory: str | Path, flt: Filter, *, as_json: bool, out: TextIO, limit: int = 0) -> int:
    """Print matching records; return how many matched."""
    count = flagged = 0
    if not as_json:
        out.write(f"{'SEQ':>7}  {'TIME':<27} {'KIND':<12} {'OUTCOME':<8} {'TOOL':<24} {'SUBJECT':<40} REASONS\n")
    for line, record in iter_lines(directory):
        if not flt.matches(record):
            continue
        count += 1
        if as_json:
            out.write(json_safe(line.decode("utf-8", "replace")) + "\n")
        else:
            subject = record.get("subject")
            spiffe_id = subject.get("spiffe_id", "") if isinstance(subject, dict) else ""
            if isinstance(subject, dict) and subject.get("source") == "dev":
                spiffe_id += " (dev)"
            reasons = ", ".join(sorted({reason_code(r) for r in record.get("reasons") or [] if isinstance(r, str)}))
            if record.get("kind") == "checkpoint":
                cp = record.get("checkpoint") or {}
                reasons = f"covers seq {cp.get('seq')} signed by {(record.get('signer') or {}).get('source', '?')} key"
            elif record.get("kind") == "startup":
                reasons = f"sidecar {record.get('sidecar', '')}" + (" (recovered a torn write)" if record.get("recovered") else "")
            elif record.get("kind") == "task_end":
                reasons = _task_end(record)
            cells = [cell(record.get("seq", "")), cell(when(record)),
                     cell(record.get("kind", "")), cell(record.get("outcome") or ""), cell(record.get("tool") or ""),
                     cell(spiffe_id), cell(reasons)]
            flagged += any(c.startswith(FLAG) for c in cells)
            seq, at, kind, outcome, tool, who, why = cells
            out.write(f"{seq:>7}  {at:<27} {kind:<12} {outcome:<8} {_cut(tool, 24):<24} {_cut(who, 40):<40} {why}\n")
        if limit and count >= limit:
            break
    if flagged:
        out.write(f"{FLAG} {flagged} record(s): a value {NOTICE}; --json shows them whole\n")
    return count


def _task_end(record: dict) -> str:
    """`task 'ID' ended by EndTask` or `task 'ID' ended after N s without calls (idle timeout)`."""
    task = f"task '{record.get('task_id', '')}'"
    idle = record.get("idle_seconds")
    if record.get("ended_by") == "idle_timeout" and isinstance(idle, (int, float)):
        return f"{task} ended after {idle:g} s without calls (idle timeout)"
    if record.get("ended_by") == "end_task":
        return f"{task} ended by EndTask"
    return f"{task} ended ({record.get('ended_by')})"


def _cut(text: str, width: int) -> str:
    """Cut a cell to width, marking the cut (a [!] flag at the start is kept)."""
    return text if len(text) <= width else text[: width - 1] + "…"
