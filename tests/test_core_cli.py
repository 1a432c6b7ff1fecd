"""The agent-sidecar command line, run as a real subprocess."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest

from sidecar.client import Client
from tests.conftest import REGO, REPO, SIMPLE_POLICY, write_policy

CLI = [sys.executable, "-m", "sidecar"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_help_explains_each_command():
    top = run("--help")
    assert top.returncode == 0
    for command in ("serve", "check", "policy"):
        assert command in top.stdout
    check = run("check", "--help")
    assert "--subject" in check.stdout and "--tool" in check.stdout and "--args" in check.stdout


def test_version_names_the_package_and_the_opa_it_would_run():
    from importlib import metadata

    from sidecar.policy.opa.runner import find_opa

    opa = find_opa()
    opa_says = subprocess.run([opa, "version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    expected = [f"agent-sidecar {metadata.version('agent-sidecar')}", f"opa {opa_says.split()[-1]} ({opa})"]
    for flag in ("--version", "-V"):
        done = run(flag, "check")  # before any command's own checks (check alone needs --subject)
        assert (done.returncode, done.stdout.splitlines(), done.stderr) == (0, expected, ""), flag


def test_check_prints_one_decision_as_json():
    allowed = run("check", "--policy", str(REGO), "--subject", "spiffe://dev.local/agent", "--tool", "read_file",
                  "--args", '{"path": "/workspace/notes.txt"}')
    assert allowed.returncode == 0, allowed.stderr
    decision = json.loads(allowed.stdout)
    assert decision["outcome"] == "allow"
    assert decision["reasons"] and decision["decision_id"] and decision["policy_revision"].startswith("sha256:")

    escalated = json.loads(run("check", "--subject", "spiffe://dev.local/agent", "--tool", "send_email",
                               "--args", '{"to": ["a@example.org"], "subject": "s", "body": "b"}').stdout)
    assert escalated["outcome"] == "escalate"


def test_check_refuses_bad_options_with_exit_2():
    bad_id = run("check", "--subject", "spiffe://Example.org/agent", "--tool", "x")
    assert bad_id.returncode == 2 and "--subject" in bad_id.stderr
    not_an_object = run("check", "--subject", "spiffe://dev.local/agent", "--tool", "read_file", "--args", "[1, 2]")
    assert not_an_object.returncode == 2 and "--args: must be a JSON object" in not_an_object.stderr
    bad_json = run("check", "--subject", "spiffe://dev.local/agent", "--tool", "x", "--args", "{nope")
    assert bad_json.returncode == 2 and "--args: not valid JSON" in bad_json.stderr


@pytest.mark.parametrize("option, text, problem", [
    ("--args", '{"path": "/workspace/a", "path": "/etc/shadow"}', "duplicate key 'path'"),
    ("--args", '{"query": {"limit": 1, "limit": 1e9}}', "duplicate key 'limit'"),
    ("--args", '{"n": NaN}', "NaN is not JSON"),
    ("--signals", '{"risk_score": -Infinity}', "-Infinity is not JSON"),
    ("--signals", '{"risk_score": 0.1, "risk_score": 0.9}', "duplicate key 'risk_score'"),
])
def test_check_refuses_json_that_reads_two_ways(option: str, text: str, problem: str):
    """A repeated key (which of its values is the call?) or a number JSON has no spelling for is bad usage,
    not read as one of its values: the call decided is the one written."""
    done = run("check", "--subject", "spiffe://dev.local/agent", "--tool", "read_file", option, text)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert f"{option}: not valid JSON: {problem}" in done.stderr


def test_config_errors_name_the_key(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text("policy:\n  timeout_ms: fast\n")
    result = run("serve", "--config", str(config))
    assert result.returncode == 2
    assert "policy.timeout_ms: must be an integer" in result.stderr
    config.write_text("polcy:\n  dir: rego\n")
    assert "polcy: unknown key" in run("serve", "--config", str(config)).stderr


def test_policy_test_reports_each_failure_and_the_totals(tmp_path):
    tests = """\
        package sidecar.tests
        test_echo_allowed if data.sidecar.decision.outcome == "allow" with input as {"tool": {"name": "echo"}}
        test_wrong_on_purpose if {
            print("printed:", {"name": "rm"})
            data.sidecar.decision.outcome == "allow" with input as {"tool": {"name": "rm"}}
        }
    """
    directory = write_policy(tmp_path / "p", SIMPLE_POLICY, tests=tests)
    result = run("policy", "test", str(directory))
    assert result.returncode == 1
    assert "FAIL policy_test.rego:3: data.sidecar.tests.test_wrong_on_purpose" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "1 passed, 1 failed"
    # Why it failed, indented under it: what the test printed, and OPA's summary of the expression that
    # failed with the value it had; not OPA's whole trace (hundreds of lines a test on the shipped bundle).
    why = result.stdout.split("test_wrong_on_purpose", 1)[1].split("passed,")[0]
    assert 'printed: {"name": "rm"}' in why
    assert "policy_test.rego:5:" in why and 'data.sidecar.decision.outcome == "allow"' in why and '"deny"' in why
    assert "Enter" not in why
    # --trace gives the whole trace instead.
    traced = run("policy", "test", "--trace", str(directory)).stdout.split("test_wrong_on_purpose", 1)[1]
    assert "Enter data.sidecar.tests.test_wrong_on_purpose" in traced and 'printed: {"name": "rm"}' in traced


def test_policy_test_counts_a_bundle_that_does_not_compile_as_a_failure(tmp_path):
    directory = write_policy(tmp_path / "p", "package sidecar\ndecision := := 1\n")
    result = run("policy", "test", str(directory))
    assert result.returncode == 1
    assert "ERROR" in result.stdout and "policy.rego:2" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "0 passed, 1 failed"


def test_policy_lint_is_opa_check_strict(tmp_path):
    unused = SIMPLE_POLICY + "\n    extra if {\n        leftover := 1\n        input.x == 2\n    }\n"
    tests = """\
        package sidecar.tests
        test_echo_allowed if data.sidecar.decision.outcome == "allow" with input as {"tool": {"name": "echo"}}
    """
    directory = write_policy(tmp_path / "p", unused, tests=tests)
    assert run("policy", "test", str(directory)).returncode == 0
    linted = run("policy", "test", "--lint", str(directory))
    assert linted.returncode == 1
    assert "opa check --strict: policy.rego:" in linted.stdout and "leftover unused" in linted.stdout


def test_a_missing_opa_is_a_clear_error_naming_the_fix(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"policy:\n  opa:\n    binary: {tmp_path / 'no-opa'}\nidentity:\n  sources: [dev]\n")
    for command in (["policy", "test", "--config", str(config), str(REGO)],
                    ["check", "--config", str(config), "--subject", "spiffe://dev.local/agent", "--tool", "x"],
                    ["serve", "--config", str(config)]):
        result = run(*command)
        assert result.returncode == 2, (command, result.stderr)
        assert "no OPA binary at" in result.stderr and "make install" in result.stderr, result.stderr


def test_policy_test_passes_on_the_shipped_bundle():
    result = run("policy", "test", str(REGO), timeout=120)
    assert result.returncode == 0, result.stdout
    passed, failed = result.stdout.strip().splitlines()[-1].split(", ")
    assert failed == "0 failed" and int(passed.split()[0]) > 20


def test_serve_answers_then_stops_cleanly_on_sigterm(tmp_path):
    config = tmp_path / "sidecar.yaml"
    socket_path = tmp_path / "s.sock"
    # The evidence log in tmp_path, not the default var/evidence of the working directory (the repo), which
    # `make run` or a parallel test run may hold.
    config.write_text(f"listen:\n  tcp: ''\n  unix: {socket_path}\npolicy:\n  dir: {REGO}\nidentity:\n  sources: [dev]\n"
                      f"evidence:\n  dir: {tmp_path / 'evidence'}\n")
    process = subprocess.Popen([*CLI, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        banner = process.stdout.readline()
        assert "serving" in banner, process.stderr.read() if process.poll() is not None else banner
        lines = []
        while not lines or not lines[-1].startswith("Send a first call"):
            lines.append(process.stdout.readline())
        first_call = process.stdout.readline().split()
        commands = [line.split("`")[1].split()[0] for line in lines if "`" in line] + [first_call[0]]
        for command in commands:  # as typed from the working directory: each one runs
            assert shutil.which(command) or (REPO / command).is_file(), (command, lines)
        with Client(f"unix:{socket_path}") as client:
            assert client.authorize("search_docs", {"query": "x"}).outcome == "allow"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
