"""Compile a PolicyBundle with the embedded Rego interpreter (regopy) and run its tests.

regopy's native library prints compile errors on stdout; they are captured
here (fd 1 redirected for the duration of a compile) so they end up in the
BundleError with their file and line, not in a `check` command's JSON.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from regopy import Interpreter

from sidecar.policy.bundle import BundleError, PolicyBundle

DECISION_ENTRYPOINT = "sidecar/decision"

_stdout_lock = threading.Lock()
_LOCATION = re.compile(r"^-- (?P<where>\S+:\d+):\d+$")
_TEST_RULE = re.compile(r"^(test_[A-Za-z0-9_]*)\b", re.MULTILINE)
_PACKAGE = re.compile(r"^package\s+([A-Za-z0-9_.]+)", re.MULTILINE)


class EvaluationError(RuntimeError):
    """The interpreter failed while evaluating (a builtin error, a conflict...)."""


@contextmanager
def _captured_native_stdout() -> Iterator[list[str]]:
    """Redirect fd 1 into a temporary file; the yielded list receives what was written."""
    captured: list[str] = []
    with _stdout_lock, tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(1)
        try:
            os.dup2(sink.fileno(), 1)
            yield captured
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def _problems_from(native_output: str, fallback: str) -> list[str]:
    """Turn rego-cpp's "message / -- file:line:col" blocks into "file:line: message"."""
    problems = []
    message: list[str] = []
    for line in native_output.splitlines():
        located = _LOCATION.match(line.strip())
        if located:
            text = " ".join(m for m in message if m and m != "Errors:") or "compile error"
            problems.append(f"{located.group('where')}: {text}")
            message = []
        elif line.startswith("---"):
            message = []
        elif line.strip() and not line.startswith(("~", " ")):
            message.append(line.strip())
    unique = list(dict.fromkeys(problems))
    return unique or [fallback]


def new_interpreter(bundle: PolicyBundle, *, with_tests: bool) -> Interpreter:
    interpreter = Interpreter()
    interpreter.strict_built_in_errors = True
    interpreter.add_data(bundle.data)
    modules = {**bundle.modules, **(bundle.tests if with_tests else {})}
    for name, source in modules.items():
        interpreter.add_module(name, source)
    return interpreter


def compile_decision(bundle: PolicyBundle) -> Any:
    """Compile the bundle's decision entrypoint; raise BundleError with file:line problems."""
    return _build(bundle, [DECISION_ENTRYPOINT], with_tests=False)[1]


def _build(bundle: PolicyBundle, entrypoints: list[str], *, with_tests: bool) -> tuple[Interpreter, Any]:
    with _captured_native_stdout() as output:
        try:
            interpreter = new_interpreter(bundle, with_tests=with_tests)
            compiled = interpreter.build(None, entrypoints)
            error = None
        except Exception as exc:  # regopy raises RegoError, or JSONDecodeError on some failures
            error = exc
    if error is not None:
        raise BundleError(_problems_from(output[0], f"policy does not compile: {error}")) from None
    return interpreter, compiled


class DuplicateKey(ValueError):
    """An object in the interpreter's output names a key twice."""


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """regopy 1.5.2 does not escape quotes in strings built by concat(): input text
    can smuggle `"outcome": "allow"` into its JSON output, and json.loads would let
    the last copy win. A repeated key is therefore an evaluation error (deny)."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(key)
        result[key] = value
    return result


def query(interpreter: Interpreter, compiled: Any, entrypoint: str) -> Any:
    """Evaluate one entrypoint; None when undefined; EvaluationError on interpreter errors."""
    try:
        output = interpreter.query_bundle_entrypoint(compiled, entrypoint)
    except Exception as exc:  # regopy raises RegoError, or JSONDecodeError on output it cannot print
        raise EvaluationError(f"the interpreter failed: {type(exc).__name__}: {str(exc)[:200]}") from None
    text = str(output)
    if text == "undefined":
        return None
    if not output.ok():
        if text.strip() == "<error>":
            raise EvaluationError("a built-in function failed or rules conflicted (strict evaluation)")
        raise EvaluationError(text.strip() or "policy evaluation failed")
    try:
        expressions = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)["expressions"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise EvaluationError("the interpreter's output is not valid JSON") from None
    except DuplicateKey as exc:
        raise EvaluationError(f"the interpreter's output repeats the key {exc.args[0]!r}") from None
    return expressions[0] if expressions else None


@dataclass(frozen=True)
class TestResult:
    file: str
    line: int
    rule: str  # fully qualified, e.g. data.sidecar.tests.test_x
    passed: bool
    detail: str = ""


def run_tests(
    bundle: PolicyBundle,
    *,
    start: int = 0,
    on_start: Callable[[int, tuple[str, int, str]], None] | None = None,
) -> Iterator[TestResult]:
    """Run the bundle's `test_*` rules (from the `start`-th on); a test passes when it is true.

    Yields each result as it completes; `on_start` hears of each test before it
    runs, so a caller can tell which test a crash interrupted.
    """
    tests = discover_tests(bundle)
    if start >= len(tests):
        return
    entrypoints = [rule.replace(".", "/") for _, _, rule in tests]
    interpreter, compiled = _build(bundle, entrypoints, with_tests=True)
    for index in range(start, len(tests)):
        file, line, rule = tests[index]
        if on_start:
            on_start(index, tests[index])
        try:
            value = query(interpreter, compiled, entrypoints[index])
        except EvaluationError as exc:
            yield TestResult(file, line, f"data.{rule}", False, f"error: {exc}")
            continue
        if value is True:
            yield TestResult(file, line, f"data.{rule}", True)
        else:
            detail = "undefined" if value is None else f"got {json.dumps(value)}"
            yield TestResult(file, line, f"data.{rule}", False, detail)


def discover_tests(bundle: PolicyBundle) -> list[tuple[str, int, str]]:
    """(file, line, package.rule) of every distinct `test_*` rule, in file order."""
    found: dict[str, tuple[str, int, str]] = {}
    for file, source in sorted(bundle.tests.items()):
        package = _PACKAGE.search(source)
        if not package:
            continue
        for match in _TEST_RULE.finditer(source):
            rule = f"{package.group(1)}.{match.group(1)}"
            line = source.count("\n", 0, match.start()) + 1
            found.setdefault(rule, (file, line, rule))
    return list(found.values())
