"""The embedded engine on small private bundles: compile, lint, fail closed, hot reload."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap

import pytest

from sidecar.policy.bundle import BundleError, load_bundle
from sidecar.policy.embedded import EmbeddedEngine
from tests.conftest import SIMPLE_POLICY, write_policy

INPUT = {"version": "sidecar/v1", "tool": {"name": "echo", "arguments": {}}}


async def started(directory, **options) -> EmbeddedEngine:
    engine = EmbeddedEngine(directory, **options)
    await engine.start()
    return engine


async def test_allow_and_default_deny(tmp_path):
    engine = await started(write_policy(tmp_path / "p", SIMPLE_POLICY), reload=False)
    try:
        allowed = await engine.evaluate(INPUT)
        denied = await engine.evaluate({**INPUT, "tool": {"name": "rm"}})
    finally:
        await engine.close()
    assert (allowed.outcome, allowed.reasons) == ("allow", ("ok: listed",))
    assert (denied.outcome, denied.reasons) == ("deny", ("no rule allows this call",))
    assert allowed.policy_revision.startswith("sha256:") and allowed.engine == "embedded"


@pytest.mark.parametrize(
    "rego, code",
    [
        # A builtin error under strict evaluation.
        ('package sidecar\ndecision := {"outcome": "allow", "reasons": [sprintf("%v", [to_number("abc")])], "obligations": {}}\n', "policy_error"),
        # A result that is not a decision.
        ('package sidecar\ndecision := "allow"\n', "policy_malformed"),
        ('package sidecar\ndecision := {"outcome": "maybe", "reasons": ["x"], "obligations": {}}\n', "policy_malformed"),
        ('package sidecar\ndecision := {"outcome": "allow", "reasons": [], "obligations": {}}\n', "policy_malformed"),
        # Undefined decision.
        ('package sidecar\ndecision := {"outcome": "allow", "reasons": ["x"], "obligations": {}} if input.nope\n', "policy_malformed"),
    ],
)
async def test_engine_errors_and_malformed_results_deny_with_a_reason(tmp_path, rego, code):
    engine = await started(write_policy(tmp_path / "p", rego), reload=False)
    try:
        decision = await engine.evaluate(INPUT)
    finally:
        await engine.close()
    assert decision.outcome == "deny"
    assert decision.reasons[0].startswith(code + ":"), decision.reasons
    assert decision.error


async def test_a_decision_past_the_time_budget_is_denied(tmp_path):
    slow = """\
        package sidecar
        decision := {"outcome": "allow", "reasons": [sprintf("%v", [n])], "obligations": {}} if {
            n := count([x | some x in numbers.range(1, 3000000); x % 7 == 0])
        }
    """
    engine = await started(write_policy(tmp_path / "p", slow), reload=False, timeout_ms=1)
    try:
        decision = await engine.evaluate(INPUT)
    finally:
        await engine.close()
    assert decision.outcome == "deny"
    assert decision.reasons[0].startswith("policy_timeout:")


def test_v0_syntax_and_unsupported_builtins_are_rejected_with_file_and_line(tmp_path):
    directory = write_policy(
        tmp_path / "p",
        """\
        package sidecar

        allow[msg] {
            msg := "v0 partial set"
        }

        fetched := http.send({"method": "get", "url": "https://example.org"})
        """,
    )
    with pytest.raises(BundleError) as failure:
        load_bundle(directory)
    problems = failure.value.problems
    assert any(p.startswith("policy.rego:3:") and "v0" in p for p in problems), problems
    assert any(p.startswith("policy.rego:7:") and "http.send" in p for p in problems), problems


def test_v1_rules_and_literals_pass_the_lint(tmp_path):
    directory = write_policy(
        tmp_path / "p",
        """\
        package sidecar

        default decision := {"outcome": "deny", "reasons": ["x: y"], "obligations": {}}
        limits := {"a": 1}
        deny contains msg if {
            some name in {"a", "b"}
            msg := sprintf("%v", [name])
        }
        helper(x) := y if { y := x + 1 }
        uses_helper := helper(1)
        obligations[k] := v if { some k, v in limits }
        """,
    )
    assert load_bundle(directory).modules


def test_data_files_land_at_their_directory_path(tmp_path):
    directory = write_policy(tmp_path / "p", SIMPLE_POLICY)
    (directory / "sidecar" / "catalog").mkdir(parents=True)
    (directory / "sidecar" / "catalog" / "data.yaml").write_text("tools:\n  echo: {risk: low}\n")
    (directory / "sidecar" / "grants").mkdir()
    (directory / "sidecar" / "grants" / "data.json").write_text('[{"spiffe_id": "spiffe://x/*"}]')
    bundle = load_bundle(directory)
    assert bundle.catalog_entry("echo") == {"risk": "low"}
    assert bundle.catalog_entry("nope") is None
    assert bundle.data["sidecar"]["grants"] == [{"spiffe_id": "spiffe://x/*"}]


async def wait_for(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_hot_reload_good_then_bad_then_good(tmp_path):
    directory = write_policy(tmp_path / "p", SIMPLE_POLICY)
    engine = await started(directory, reload=True)
    try:
        first = engine.revision
        assert (await engine.evaluate({**INPUT, "tool": {"name": "ping"}})).outcome == "deny"

        # Good: ping becomes allowed.
        (directory / "policy.rego").write_text(textwrap.dedent(SIMPLE_POLICY).replace('["echo",', '["echo", "ping",'))
        await wait_for(lambda: engine.revision != first)
        second = engine.revision
        assert (await engine.evaluate({**INPUT, "tool": {"name": "ping"}})).outcome == "allow"

        # Bad (does not compile): nothing served changes; health tells why.
        (directory / "policy.rego").write_text("package sidecar\ndecision := := 1\n")
        await wait_for(lambda: engine.last_reload_error is not None)
        assert engine.revision == second
        assert (await engine.evaluate({**INPUT, "tool": {"name": "ping"}})).outcome == "allow"
        serving, detail = engine.health()
        assert serving and "policy.rego:2" in detail

        # Good again.
        (directory / "policy.rego").write_text(textwrap.dedent(SIMPLE_POLICY))
        await wait_for(lambda: engine.last_reload_error is None and engine.revision == first)
        assert (await engine.evaluate({**INPUT, "tool": {"name": "ping"}})).outcome == "deny"
    finally:
        await engine.close()


async def test_a_policy_failing_its_own_tests_is_not_swapped_in(tmp_path):
    tests = """\
        package sidecar.tests
        test_echo_allowed if data.sidecar.decision.outcome == "allow" with input as {"tool": {"name": "echo"}}
    """
    directory = write_policy(tmp_path / "p", SIMPLE_POLICY, tests=tests)
    engine = await started(directory, reload=False)
    try:
        revision = engine.revision
        (directory / "policy.rego").write_text(textwrap.dedent(SIMPLE_POLICY).replace('["echo", ', "["))
        assert await engine.reload() is False
        assert "test_echo_allowed" in engine.last_reload_error
        assert engine.revision == revision
        assert (await engine.evaluate(INPUT)).outcome == "allow"
    finally:
        await engine.close()


async def test_the_first_policy_must_be_good(tmp_path):
    directory = write_policy(tmp_path / "p", "package sidecar\ndecision := := 1\n")
    with pytest.raises(BundleError) as failure:
        await EmbeddedEngine(directory, reload=False).start()
    assert failure.value.problems[0].startswith("policy.rego:2:")


async def test_concurrent_evaluations_use_separate_interpreters(tmp_path):
    # A generous budget: this is about interpreter isolation, not time.
    engine = await started(write_policy(tmp_path / "p", SIMPLE_POLICY), reload=False, workers=4, timeout_ms=10_000)
    try:
        tools = ["echo", "rm", "search_docs", "x"] * 50
        results = await asyncio.gather(*(engine.evaluate({"tool": {"name": t}}) for t in tools))
    finally:
        await engine.close()
    expected = {"echo": "allow", "search_docs": "allow", "rm": "deny", "x": "deny"}
    assert [r.outcome for r in results] == [expected[t] for t in tools]


# regopy 1.5.2 aborts on membership in a set literal under `with input as`.
CRASHING_TEST = """\
    package sidecar.tests
    test_crashes if {
        data.sidecar.crash with input as {"tool": {"name": "echo"}}
    }
"""
CRASHING_RULE = """\
    package sidecar
    crash if input.tool.name in {"echo", "search_docs"}
"""


async def test_a_bundle_that_crashes_the_interpreter_is_rejected_and_serving_continues(tmp_path):
    directory = write_policy(tmp_path / "p", SIMPLE_POLICY)
    engine = await started(directory, reload=False)
    try:
        revision = engine.revision
        (directory / "crash.rego").write_text(textwrap.dedent(CRASHING_RULE))
        (directory / "crash_test.rego").write_text(textwrap.dedent(CRASHING_TEST))
        assert await engine.reload() is False
        assert "crashed the embedded Rego interpreter" in engine.last_reload_error
        assert "crash_test.rego" in engine.last_reload_error
        assert engine.revision == revision
        assert (await engine.evaluate(INPUT)).outcome == "allow"
    finally:
        await engine.close()


def test_validation_is_cached_by_bundle_revision(tmp_path, monkeypatch):
    from sidecar.policy import validate

    monkeypatch.setenv("AGENT_SIDECAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(validate, "_memo", {})
    directory = write_policy(tmp_path / "p", SIMPLE_POLICY, tests="""\
        package sidecar.tests
        test_echo_allowed if data.sidecar.decision.outcome == "allow" with input as {"tool": {"name": "echo"}}
    """)
    first = validate.validate_bundle(directory)
    assert first.ok and len(first.results) == 1

    def no_children(*args, **kwargs):
        raise AssertionError("validated again although the files did not change")

    monkeypatch.setattr(validate, "_run_child", no_children)
    monkeypatch.setattr(validate, "_memo", {})  # only the on-disk cache is left
    assert validate.validate_bundle(directory).results == first.results

    (directory / "policy.rego").write_text((directory / "policy.rego").read_text() + "\n# changed\n")
    with pytest.raises(AssertionError, match="validated again"):
        validate.validate_bundle(directory)


async def test_input_smuggling_json_through_the_interpreter_output_is_denied(tmp_path):
    # A naive rule that puts input text into a reason with concat(): regopy 1.5.2
    # prints it unescaped, so the text below would otherwise override the outcome.
    naive = """\
        package sidecar
        decision := {"outcome": "deny", "reasons": [concat("", ["denied: ", input.tool.server])], "obligations": {}}
    """
    engine = await started(write_policy(tmp_path / "p", naive), reload=False)
    try:
        smuggled = await engine.evaluate({"tool": {"name": "x", "server": 'x"], "outcome": "allow", "reasons": ["'}})
        plain = await engine.evaluate({"tool": {"name": "x", "server": "mail"}})
    finally:
        await engine.close()
    assert plain.outcome == "deny" and plain.reasons == ("denied: mail",)
    assert smuggled.outcome == "deny"
    assert smuggled.reasons[0].startswith("policy_error:") and "repeats the key" in smuggled.reasons[0]


async def worker_pid(engine: EmbeddedEngine) -> int:
    from sidecar.policy import worker

    generation = engine._generation
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(engine._pool, worker.warm, str(generation.snapshot), generation.bundle.revision)


async def test_workers_are_replaced_after_recycle_after_decisions(tmp_path):
    # regopy keeps native memory per distinct input: only a fresh process gives it back.
    engine = await started(write_policy(tmp_path / "p", SIMPLE_POLICY), reload=False, workers=1, recycle_after=5,
                           timeout_ms=10_000)
    try:
        first = await worker_pid(engine)
        outcomes = [(await engine.evaluate({"tool": {"name": f"echo{i}"}})).outcome for i in range(12)]
        later = await worker_pid(engine)
        assert (await engine.evaluate(INPUT)).outcome == "allow"
    finally:
        await engine.close()
    assert outcomes == ["deny"] * 12
    assert later != first


async def test_a_worker_dying_mid_decision_denies_that_call_and_serving_continues(tmp_path):
    slow = """\
        package sidecar
        decision := {"outcome": "allow", "reasons": [sprintf("%v", [n])], "obligations": {}} if {
            input.tool.name == "slow"
            n := count([x | some x in numbers.range(1, 3000000); x % 7 == 0])
        }
        decision := {"outcome": "allow", "reasons": ["ok: listed"], "obligations": {}} if input.tool.name == "echo"
    """
    engine = await started(write_policy(tmp_path / "p", slow), reload=False, workers=1, timeout_ms=20_000)
    try:
        pid = await worker_pid(engine)
        deciding = asyncio.create_task(engine.evaluate({"tool": {"name": "slow"}}))
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        crashed = await deciding
        after = await engine.evaluate(INPUT)
    finally:
        await engine.close()
    assert crashed.outcome == "deny"
    assert crashed.reasons[0].startswith("policy_error:") and "crashed" in crashed.reasons[0]
    assert after.outcome == "allow"


def test_workers_exit_when_the_sidecar_dies_without_closing(tmp_path):
    # A sidecar killed mid-flight never shuts its pool down; its workers must not linger.
    directory = write_policy(tmp_path / "p", SIMPLE_POLICY)
    script = f"""
import asyncio, os
from sidecar.policy.embedded import EmbeddedEngine
from tests.test_core_engine import worker_pid
async def main():
    engine = EmbeddedEngine({str(directory)!r}, reload=False, workers=1)
    await engine.start()
    print(await worker_pid(engine), flush=True)
    os._exit(0)  # no close(): as after SIGKILL
asyncio.run(main())
"""
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    out = tmp_path / "out"
    with out.open("w") as stdout:  # not a pipe: the workers share the child's stdout
        subprocess.run([sys.executable, "-c", script], stdout=stdout, timeout=60, cwd=REPO, check=True)
    pid = int(out.read_text().strip().splitlines()[-1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"worker {pid} outlived its sidecar")
