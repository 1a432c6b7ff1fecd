"""OPA's own tools for the policy lifecycle, run as subprocesses: check, test, build.

- `check(binary, dir)`: `opa check --strict --format json` (the lint); problems
  as "file:row: code: message".
- `run_tests(binary, dir)`: `opa test --format json`; one `TestResult` per
  test_* rule, plus bundle-level problems (a file that does not parse, data
  that does not load). `explain_failures` runs the failing ones again with
  `--var-values` and returns, per test, its `print()` output and OPA's
  summary of the expression that failed with the values it saw (with
  `trace=True`, OPA's whole trace of the failure, `--explain fails`).
- `build(binary, dir, output, revision)`: `opa build --bundle` into a tarball
  whose `.manifest` revision is `revision` (what OPA then reports in
  `?provenance`).

Each raises `PolicyToolError` (its `problems`, one line each) when the tool
itself cannot run or answers what it should not; test failures are results,
not errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path


class PolicyToolError(RuntimeError):
    """An OPA tool run failed; `problems` are one-line messages (file:row: ... when OPA gives a place)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TestResult:
    file: str
    row: int
    package: str
    name: str
    passed: bool
    error: str = ""  # OPA's error message when the test errored (not just failed)

    @property
    def rule(self) -> str:
        return f"{self.package}.{self.name}"


@dataclass
class TestReport:
    results: list[TestResult]
    problems: list[str]  # the bundle did not load or compile

    @property
    def failed(self) -> list[TestResult]:
        return [r for r in self.results if not r.passed]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failed


async def _run(argv: list[str], *, timeout: float) -> tuple[int, str, str]:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except FileNotFoundError:
        raise PolicyToolError([f"cannot run {argv[0]}: no such file"]) from None
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise PolicyToolError([f"`{' '.join(argv[1:3])}` did not finish within {timeout:.0f} s"]) from None
    return process.returncode or 0, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _relative(file: str, directory: Path) -> str:
    try:
        return os.path.relpath(file, directory) if os.path.isabs(file) or file.startswith(str(directory)) else file
    except ValueError:
        return file


def _errors_from(text: str, directory: Path) -> list[str]:
    """OPA's `{"errors": [...]}` (or a bare list) as "file:row: code: message" lines; [] if not that shape."""
    start = text.find("{")
    if start < 0:
        return []
    try:
        body = json.loads(text[start:])
    except ValueError:
        return []
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return []
    problems = []
    for error in errors:
        if not isinstance(error, dict):
            continue
        location = error.get("location") or {}
        place = ""
        if location.get("file"):
            place = f"{_relative(location['file'], directory)}:{location.get('row', 0)}: "
        code = f"{error['code']}: " if error.get("code") else ""
        problems.append(f"{place}{code}{error.get('message', '')}")
    return list(dict.fromkeys(problems))


def _text_problems(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("\t")]
    return lines[:20] or ["(no output)"]


async def check(binary: str, directory: Path, *, timeout: float = 60.0) -> list[str]:
    """`opa check --strict`: [] when clean, else the problems (file:row: code: message)."""
    code, out, err = await _run(
        [binary, "check", "--strict", "--format", "json", "--bundle", str(directory)],
        timeout=timeout,
    )
    if code == 0:
        return []
    return _errors_from(out, directory) or _errors_from(err, directory) or _text_problems(err or out)


async def run_tests(binary: str, directory: Path, *, run: str = "", timeout: float = 120.0) -> TestReport:
    """`opa test --format json` on the directory (bundle mode); `run` is OPA's --run regex."""
    argv = [binary, "test", "--format", "json", "--bundle", str(directory)]
    if run:
        argv += ["--run", run]
    code, out, err = await _run(argv, timeout=timeout)
    try:
        raw = json.loads(out) if out.strip() else None
    except ValueError:
        raw = None
    if not isinstance(raw, list):
        problems = _errors_from(out, directory) or _errors_from(err, directory) or _text_problems(err or out)
        return TestReport([], problems)
    results = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        location = item.get("location") or {}
        error = item.get("error")
        message = ""
        if error:
            message = error.get("message", json.dumps(error)) if isinstance(error, dict) else str(error)
        results.append(
            TestResult(
                file=_relative(str(location.get("file", "")), directory),
                row=int(location.get("row", 0)),
                package=str(item.get("package", "")),
                name=str(item.get("name", "")),
                passed=not item.get("fail") and not error and not item.get("skip"),
                error=message,
            )
        )
    problems = [] if code in (0, 2) else _text_problems(err)
    return TestReport(results, problems)


_FAILURE_HEADER = re.compile(r"^(data\.\S+): (FAIL|ERROR)\b")
_SUMMARY = re.compile(r"^(PASS|FAIL|ERROR|SKIPPED): \d+/\d+$")


async def explain_failures(
    binary: str, directory: Path, failed: list[TestResult], *, trace: bool = False
) -> dict[str, str]:
    """Why each failed test failed, keyed by `rule`: what it printed (`print()`), then OPA's summary of the
    expression that failed and the values it saw (`--var-values`); with `trace`, OPA's whole trace of the
    failure (`--explain fails`, every rule body entered and failed on the way: hundreds of lines a test)."""
    if not failed:
        return {}
    names = "|".join(re.escape(result.rule) for result in failed)
    argv = [binary, "test", "--var-values", "--bundle", "--run", f"^({names})$", str(directory)]
    if trace:
        argv[2:2] = ["--explain", "fails"]
    _, out, _ = await _run(argv, timeout=120.0)
    before, _, section = out.partition("FAILURES\n")
    printed, explained = _indented_blocks(before), _indented_blocks(section)
    return {
        rule: "\n".join([*printed.get(rule, []), *explained.get(rule, [])]).strip("\n")
        for rule in dict.fromkeys([*printed, *explained])
    }


def _indented_blocks(text: str) -> dict[str, list[str]]:
    """OPA's text report: the indented lines under each `data.x.test_y: FAIL` header (its print output before
    `FAILURES`, its explanation after), up to the summary."""
    blocks: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        header = _FAILURE_HEADER.match(line)
        if header:
            current = header.group(1)
            blocks[current] = []
        elif _SUMMARY.match(line):
            break
        elif current is not None and line[:1].isspace() and line.strip():
            blocks[current].append(line.rstrip())
    return blocks


async def build(binary: str, directory: Path, output: Path, revision: str, *, timeout: float = 60.0) -> None:
    """`opa build --bundle DIR --revision REV -o OUTPUT`, tests left out; PolicyToolError if it fails."""
    code, out, err = await _run(
        [binary, "build", "--bundle", str(directory), "--revision", revision,
         "--ignore", "*_test.rego", "--output", str(output)],
        timeout=timeout,
    )
    if code != 0:
        raise PolicyToolError(_errors_from(out, directory) or _errors_from(err, directory) or _text_problems(err))
