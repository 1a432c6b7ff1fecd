"""`agent-sidecar policy replay`: re-decide recorded decisions with a candidate bundle.

Each `decision` record of the evidence log carries the policy input as it was
sent to OPA (`input`, sidecar/evidence/records.py `replay_input`). Replay reads
the records (filters: time, tool, subject), starts ONE managed OPA on the
candidate directory through `PolicyService` (so the candidate passes the same
`opa check --strict` + `opa test` + `opa build` gate as a hot reload, or is
refused before anything is replayed), and asks it for every input again.

What goes to the candidate is the recorded input, with one change:
`tool.catalog` is the candidate's own catalog entry for the tool (a candidate
may change the catalog); `tool.facts` are recomputed from it when the record
holds the arguments in clear, else kept as recorded.

What is compared: the recorded outcome (OPA's own answer, `policy_decision`,
when the record's outcome was changed after policy, e.g. an approval that could
not be used) against the replayed one. A decision is *changed* when the
outcome differs; reasons are shown, not compared.

Skipped, and counted by why: records decided before policy (a malformed call,
an unverified caller: nothing was sent to OPA), records whose policy call failed
(a fail-closed deny is not a policy answer), records from before replayable
evidence (no `input`).

Errors: `ReplayError(message, exit_code)` for what stops a replay (no log,
a log `evidence verify` rejects, nothing to replay); the candidate's own
refusal is `PolicyRejected` / `OpaNotFound` from the policy service.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable

from sidecar.evidence.log import list_log_files
from sidecar.evidence.records import parse_rfc3339
from sidecar.evidence.show import Filter, iter_lines
from sidecar.evidence.verify import BROKEN, verify_dir, where_logs_are
from sidecar.evidence.verify import format_report as verify_text
from sidecar.policy.input import with_catalog_entry
from sidecar.policy.opa.client import OpaClientOptions
from sidecar.policy.opa.service import ManagedOpaOptions, PolicyService

# Exit codes of `agent-sidecar policy replay` (docs/policy-authoring.md).
EXIT_OK = 0
EXIT_FAIL_ON = 1  # a decision changed to a --fail-on outcome, or the candidate failed to answer one
EXIT_USAGE = 2  # bad usage; the candidate refused (opa check / opa test / opa build) or no OPA
EXIT_NOTHING = 3  # no decision record to replay (none at all, none matching, none replayable)
EXIT_UNVERIFIED = 4  # the evidence log fails `evidence verify` (use --no-verify to replay anyway)

# Under a changed decision whose arguments the record holds only as digests: a rule that reads their text (a
# path prefix, a URL host, SQL facts) decided on the digests, so the change may be the replay's, not the candidate's.
DIGESTED_NOTE = "(arguments recorded as digests: rules reading their text decided on the digests, not the call)"

SKIP_BEFORE_POLICY = "decided before policy (nothing was sent to OPA)"
SKIP_POLICY_FAILED = "the policy call failed when recorded (a fail-closed deny, not a policy answer)"
SKIP_NO_INPUT = "recorded before replayable evidence (no input)"


class ReplayError(Exception):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Recorded:
    """One replayable decision record."""

    decision_id: str
    time: str
    tool: str
    subject: str
    outcome: str
    reasons: tuple[str, ...]
    revision: str
    input: dict
    arguments_in_clear: bool


@dataclass(frozen=True)
class Replayed:
    recorded: Recorded
    outcome: str
    reasons: tuple[str, ...]
    error: str | None = None  # the candidate's OPA failed on this input

    @property
    def changed(self) -> bool:
        return self.error is None and self.outcome != self.recorded.outcome


@dataclass
class ReplayReport:
    evidence: str
    candidate: str
    revision: str = ""
    results: list[Replayed] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    @property
    def changed(self) -> list[Replayed]:
        return [r for r in self.results if r.changed]

    @property
    def errors(self) -> list[Replayed]:
        return [r for r in self.results if r.error is not None]

    def transitions(self) -> Counter:
        return Counter((r.recorded.outcome, r.outcome) for r in self.results if r.error is None)


@dataclass(frozen=True)
class Selection:
    """Which decision records to replay: all `Filter` fields of `evidence show` plus `until`."""

    tool: str = ""
    subject: str = ""
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, record: dict) -> bool:
        if not Filter(tool=self.tool, subject=self.subject, since=self.since, kind="decision").matches(record):
            return False
        if self.until is not None:
            try:
                return parse_rfc3339(str(record.get("time") or record.get("logged_at"))) <= self.until
            except ValueError:
                return False
        return True


def read_decisions(directory: str | Path, selection: Selection, *, verify: bool = True) -> tuple[list[Recorded], Counter]:
    """The replayable decisions in the log that match, and the skipped ones counted by why.

    ReplayError: no log in `directory` (EXIT_NOTHING), a log `evidence verify` rejects (EXIT_UNVERIFIED).
    """
    directory = Path(directory)
    if not directory.is_dir() or not list_log_files(directory):
        raise ReplayError(
            f"no evidence log in {directory} (no evidence-NNNNNN.jsonl files){where_logs_are(directory)}", EXIT_NOTHING
        )
    if verify:
        report = verify_dir(directory)
        if report.verdict == BROKEN:
            raise ReplayError(
                f"the evidence log in {directory} fails verification; nothing replayed "
                f"(--no-verify replays it anyway):\n{verify_text(report)}",
                EXIT_UNVERIFIED,
            )
    recorded: list[Recorded] = []
    skipped: Counter = Counter()
    for _, record in iter_lines(directory):
        if not selection.matches(record):
            continue
        document = record.get("input")
        if record.get("engine") == "sidecar":
            skipped[SKIP_BEFORE_POLICY] += 1
        elif record.get("engine_error"):
            skipped[SKIP_POLICY_FAILED] += 1
        elif not isinstance(document, dict):
            skipped[SKIP_NO_INPUT] += 1
        else:
            answer = record.get("policy_decision")
            if not isinstance(answer, dict):
                answer = record
            subject = record.get("subject")
            recorded.append(
                Recorded(
                    decision_id=str(record.get("decision_id", "")),
                    time=str(record.get("time", "")),
                    tool=str(record.get("tool", "")),
                    subject=str(subject.get("spiffe_id", "")) if isinstance(subject, dict) else "",
                    outcome=str(answer.get("outcome", "")),
                    reasons=tuple(str(r) for r in answer.get("reasons") or ()),
                    revision=str(record.get("policy_revision", "")),
                    input=document,
                    arguments_in_clear="arguments" in record,
                )
            )
    return recorded, skipped


def candidate_input(recorded: Recorded, catalog_entry: dict | None) -> dict:
    """The recorded input with the candidate's catalog entry (and, for clear arguments, its facts)."""
    return with_catalog_entry(recorded.input, catalog_entry, recompute_facts=recorded.arguments_in_clear)


def candidate_service(candidate: str | Path, binary: str) -> PolicyService:
    """One managed OPA on the candidate: checked, tested and built like a hot reload; never watched."""
    return PolicyService(
        candidate,
        OpaClientOptions(timeout_ms=10_000, breaker_failures=1_000_000),
        managed=ManagedOpaOptions(binary=binary),
        reload=False,
    )


async def replay(
    evidence: str | Path,
    candidate: str | Path,
    selection: Selection = Selection(),
    *,
    binary: str = "opa",
    verify: bool = True,
    concurrency: int = 16,
) -> ReplayReport:
    """Re-decide every matching recorded decision with OPA on `candidate` (see the module docstring).

    Raises ReplayError (see read_decisions; EXIT_NOTHING when no record is replayable),
    PolicyRejected (the candidate fails check, test or build), OpaNotFound.
    """
    recorded, skipped = read_decisions(evidence, selection, verify=verify)
    report = ReplayReport(str(evidence), str(candidate), skipped=skipped)
    if not recorded:
        why = "; ".join(f"{count} {reason}" for reason, count in skipped.items())
        raise ReplayError(
            f"no decision to replay in {evidence}" + (f": skipped {sum(skipped.values())} ({why})" if skipped else
                                                       " (no decision record matches)"),
            EXIT_NOTHING,
        )
    async with candidate_service(candidate, binary) as service:
        report.revision = service.revision
        gate = asyncio.Semaphore(concurrency)

        async def one(item: Recorded) -> Replayed:
            async with gate:
                decision = await service.decide(candidate_input(item, service.catalog.entry(item.tool)))
            return Replayed(item, decision.outcome, tuple(decision.reasons), decision.error)

        report.results = list(await asyncio.gather(*(one(item) for item in recorded)))
    return report


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_report(report: ReplayReport) -> str:
    """The human summary; the last line is `N replayed, M changed`."""
    lines = [f"replayed {len(report.results)} decisions from {report.evidence} "
             f"with the candidate {report.candidate} (revision {report.revision})"]
    if report.skipped:
        lines.append(f"skipped {sum(report.skipped.values())}:")
        lines += [f"  {count} {reason}" for reason, count in sorted(report.skipped.items())]
    digested = sum(1 for r in report.results if not r.recorded.arguments_in_clear)
    if digested:
        lines.append(f"note: {digested} had their arguments recorded as digests: rules reading argument values "
                     "see digests (equality only; docs/evidence.md, Replayable input)")
    lines.append("")
    lines.append(f"{'recorded':<10} {'replayed':<10} {'count':>6}")
    for (before, after), count in sorted(report.transitions().items()):
        lines.append(f"{before:<10} {after:<10} {count:>6}" + ("" if before == after else "  changed"))
    if report.changed:
        lines.append("")
        lines.append("changed:")
        for r in report.changed:
            item = r.recorded
            lines.append(f"  {item.decision_id}  {item.tool}  {item.subject}  {item.outcome} -> {r.outcome}")
            lines.append(f"      recorded ({_cell(item.revision, 32)}): {'; '.join(item.reasons)}")
            lines.append(f"      replayed: {'; '.join(r.reasons)}")
            if not item.arguments_in_clear:
                lines.append(f"      {DIGESTED_NOTE}")
    if report.errors:
        lines.append("")
        lines.append(f"the candidate could not decide {len(report.errors)}:")
        lines += [f"  {r.recorded.decision_id}  {r.recorded.tool}: {r.error}" for r in report.errors]
    lines.append(f"{len(report.results)} replayed, {len(report.changed)} changed")
    return "\n".join(lines)


def json_lines(report: ReplayReport) -> Iterable[str]:
    """One JSON object per changed decision (`--json`)."""
    for r in report.changed:
        item = r.recorded
        yield json.dumps(
            {
                "decision_id": item.decision_id,
                "time": item.time,
                "tool": item.tool,
                "subject": item.subject,
                "recorded": {"outcome": item.outcome, "reasons": list(item.reasons), "revision": item.revision},
                "replayed": {"outcome": r.outcome, "reasons": list(r.reasons), "revision": report.revision},
                "arguments_digested": not item.arguments_in_clear,
            },
            sort_keys=True,
        )


def exit_code(report: ReplayReport, fail_on: Iterable[str] = ()) -> int:
    """EXIT_FAIL_ON when a decision changed to a `fail_on` outcome or the candidate failed on one; else EXIT_OK."""
    targets = set(fail_on)
    if report.errors:
        return EXIT_FAIL_ON
    if any(r.outcome in targets for r in report.changed):
        return EXIT_FAIL_ON
    return EXIT_OK
