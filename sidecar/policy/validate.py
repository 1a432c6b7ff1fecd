"""Check a bundle in a child process before it may serve: lint, compile, run its tests.

The embedded interpreter is native code, and some Rego crashes it (seen here:
`x in {"a", "b"}` under `with input as` aborts regopy 1.5.2). Validating in a
child keeps such a bundle from taking the sidecar (or `policy test`) down.
A crash fails what was running: the test, or — when it struck while
compiling a test file — that file's tests; the rest run in a fresh child.

The child speaks JSON lines on stdout: {"revision"}, {"problems"},
{"start": i}, {"result": {...}}, {"done": true}. Reports are cached by bundle
revision (a digest of every file) and interpreter version, in memory and in
$AGENT_SIDECAR_CACHE_DIR (default ~/.cache/agent-sidecar): the same files
always validate the same way, and a big bundle's tests take seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

from sidecar.policy.bundle import BundleError, PolicyBundle, load_bundle
from sidecar.policy.compiler import TestResult, compile_decision, discover_tests, run_tests


@dataclass
class ValidationReport:
    revision: str = ""
    problems: list[str] = field(default_factory=list)  # bundle-level: lint / compile
    results: list[TestResult] = field(default_factory=list)

    @property
    def failed(self) -> list[TestResult]:
        return [r for r in self.results if not r.passed]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failed


@dataclass
class _ChildRun:
    results: list[TestResult]
    problems: list[str]
    done: bool
    running: int | None  # index of the test a crash interrupted
    exit_code: int
    stderr: str
    revision: str = ""  # of the files the child read


def _run_child(directory: Path, *, test_file: str | None, start: int, timeout: float) -> _ChildRun:
    command = [sys.executable, "-m", "sidecar.policy.validate", str(directory), "--from", str(start)]
    if test_file is not None:
        command += ["--file", test_file]
    child = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    run = _ChildRun([], [], False, None, child.returncode, child.stderr.strip()[-300:])
    for line in child.stdout.splitlines():
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue  # native library chatter
        if "revision" in message:
            run.revision = message["revision"]
        elif "problems" in message:
            run.problems = message["problems"]
        elif "start" in message:
            run.running = message["start"]
        elif "result" in message:
            run.results.append(TestResult(**message["result"]))
            run.running = None
        elif message.get("done"):
            run.done = True
    return run


def _crash_detail(run: _ChildRun, what: str) -> str:
    why = run.stderr.splitlines()[-1] if run.stderr else f"exit {run.exit_code}"
    return f"crashed the embedded Rego interpreter {what} ({why})"


def _run_selection(
    directory: Path, tests: list[tuple[str, int, str]], test_file: str | None, report: ValidationReport, timeout: float
) -> bool:
    """Run the tests of one selection (all files, or one); False if it crashed while compiling."""
    start = 0
    while start < len(tests) or start == 0:
        run = _run_child(directory, test_file=test_file, start=start, timeout=timeout)
        if run.revision and run.revision != report.revision:
            report.problems.append(f"{directory}: policy files changed while they were being validated")
            return True
        report.results += run.results
        if run.problems:
            report.problems += run.problems
            return True
        if run.done:
            return True
        if run.running is None:
            if not run.results:
                return False  # died compiling this selection
            run.running = start + len(run.results)
        file, line, rule = tests[run.running]
        report.results.append(TestResult(file, line, f"data.{rule}", False, _crash_detail(run, "running this test")))
        start = run.running + 1
        if start >= len(tests):
            return True
    return True


def _cache_dir() -> Path:
    base = os.environ.get("AGENT_SIDECAR_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "agent-sidecar" / "validated"


def _cache_key(revision: str) -> str:
    """The bundle's content digest and the interpreter it was validated with."""
    stamp = f"{revision}|regopy {version('regopy')}|agent-sidecar {version('agent-sidecar')}"
    return hashlib.sha256(stamp.encode()).hexdigest()


_memo: dict[str, ValidationReport] = {}


def _cached(revision: str) -> ValidationReport | None:
    key = _cache_key(revision)
    if key in _memo:
        return _memo[key]
    try:
        raw = json.loads((_cache_dir() / f"{key}.json").read_text())
        report = ValidationReport(raw["revision"], raw["problems"], [TestResult(**r) for r in raw["results"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    _memo[key] = report
    return report


def _remember(report: ValidationReport) -> None:
    """Keep a report: the same files with the same interpreter always validate the same way."""
    key = _cache_key(report.revision)
    _memo[key] = report
    try:
        _cache_dir().mkdir(parents=True, exist_ok=True)
        payload = {"revision": report.revision, "problems": report.problems,
                   "results": [asdict(r) for r in report.results]}
        (_cache_dir() / f"{key}.json").write_text(json.dumps(payload))
    except OSError:
        pass  # a read-only home (e.g. in a pod) only costs a re-validation


def validate_bundle(directory: str | Path, timeout: float = 120.0) -> ValidationReport:
    """Validate `directory` (lint, compile, run its tests); reports are cached by bundle revision."""
    directory = Path(directory)
    try:
        bundle = load_bundle(directory)  # lint only: pure Python
    except BundleError as exc:
        return ValidationReport(problems=exc.problems)
    cached = _cached(bundle.revision)
    if cached is not None:
        return cached
    report = _validate_in_children(directory, bundle, timeout)
    if not any("changed while they were being validated" in p for p in report.problems):
        _remember(report)
    return report


def _validate_in_children(directory: Path, bundle: PolicyBundle, timeout: float) -> ValidationReport:
    report = ValidationReport(revision=bundle.revision)
    tests = discover_tests(bundle)
    if _run_selection(directory, tests, None, report, timeout):
        return report
    if not report.problems and not report.results and not tests:
        report.problems = ["the embedded Rego interpreter crashed compiling the policy"]
        return report
    # Compiling all tests together crashed: go file by file to find which.
    for test_file in sorted(bundle.tests):
        selection = [t for t in tests if t[0] == test_file]
        if not _run_selection(directory, selection, test_file, report, timeout):
            report.results += [
                TestResult(f, line, f"data.{rule}", False, "crashed the embedded Rego interpreter compiling this file's tests")
                for f, line, rule in selection
            ]
    return report


def _select(bundle: PolicyBundle, test_file: str | None) -> PolicyBundle:
    if test_file is None:
        return bundle
    return PolicyBundle(bundle.root, bundle.modules, {test_file: bundle.tests[test_file]}, bundle.data, bundle.manifest, bundle.revision)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="internal: validate a policy bundle (run by the sidecar)")
    parser.add_argument("directory")
    parser.add_argument("--from", dest="start", type=int, default=0)
    parser.add_argument("--file", dest="test_file")
    args = parser.parse_args(argv)

    def emit(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    try:
        bundle = _select(load_bundle(args.directory), args.test_file)
        emit({"revision": bundle.revision})
        compile_decision(bundle)
        for result in run_tests(bundle, start=args.start, on_start=lambda index, _test: emit({"start": index})):
            emit({"result": asdict(result)})
    except BundleError as exc:
        emit({"problems": exc.problems})
        return 0
    emit({"done": True})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
