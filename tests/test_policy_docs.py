"""The examples in docs/policy-authoring.md (with the real OPA) and docs/policy-input.md run."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import yaml

from sidecar.policy.facts import argument_facts
from sidecar.policy.facts.sql import sql_facts
from tests.conftest import REGO, REPO
from tests.test_policy_facts_fixture import refresh

OPA = str(REPO / ".tools" / "bin" / "opa")
CLI = [sys.executable, "-m", "sidecar"]
DOC = (REPO / "docs" / "policy-authoring.md").read_text()
# Fenced blocks, also those indented inside a list item (dedented).
FENCED = [(kind, textwrap.dedent(body)) for kind, body in
          re.findall(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", DOC, flags=re.S | re.M)]


def block(containing: str, kind: str = "rego") -> str:
    (found,) = [body for k, body in FENCED if k == kind and containing in body]
    return found


def apply_new_tool_example(bundle: Path) -> Path:
    """Make `bundle` (a copy of rego/) what "A new tool, end to end" says to make of it, as a reader edits it."""
    sidecar = bundle / "sidecar"
    catalog = sidecar / "catalog" / "data.yaml"
    entry = block("export_report:\n  risk: medium", "yaml")
    assert catalog.read_text().rstrip().endswith("title: string"), "tools: is no longer the catalog's last key"
    catalog.write_text(catalog.read_text().rstrip() + "\n\n" + textwrap.indent(entry, "  "))

    grants = sidecar / "grants" / "data.yaml"
    (grant,) = yaml.safe_load(block("tools: [run_sql, write_file, export_report]", "yaml"))
    shipped = yaml.safe_load(grants.read_text())
    (old,) = [g for g in shipped if g["spiffe_id"] == grant["spiffe_id"]]
    assert [t for t in grant["tools"] if t != "export_report"] == old["tools"], "the doc's grant drifted from rego/"
    text = grants.read_text()
    old_text = re.search(r'- spiffe_id: "%s"\n(  .*\n)+' % re.escape(grant["spiffe_id"]), text).group(0)
    grants.write_text(text.replace(old_text, block("tools: [run_sql, write_file, export_report]", "yaml")))

    limits = sidecar / "limits" / "data.yaml"
    wanted = yaml.safe_load(block("risk_score_thresholds:", "yaml"))
    text = limits.read_text()
    shipped = yaml.safe_load(text)
    assert {k: v for k, v in wanted["path_prefixes"].items() if k != "export_report"} == shipped["path_prefixes"]
    last = text.index('  write_file: ["/workspace/"]\n') + len('  write_file: ["/workspace/"]\n')
    text = text[:last] + '  export_report: ["/exports/"]\n' + text[last:]
    threshold = block("risk_score_thresholds:", "yaml").split("\n\n", 1)[1]
    limits.write_text(text.rstrip() + "\n\n" + threshold)
    assert yaml.safe_load(limits.read_text()) == {**shipped, **wanted}

    common = sidecar / "common.rego"
    assert '\t"risk_score_threshold": 0.7,\n' in common.read_text()
    common.write_text(common.read_text().replace('\t"risk_score_threshold": 0.7,\n',
                                                 '\t"risk_score_threshold": 0.7,\n\t"risk_score_thresholds": {},\n'))
    risk = sidecar / "risk.rego"
    risk.write_text(risk.read_text().rstrip() + "\n\n" + block("risk_score_thresholds[input.tool.name]"))
    (sidecar / "tests" / "export_report_test.rego").write_text(block("test_export_report_allowed_for_the_data_agent"))
    return bundle


def opa_test(path) -> subprocess.CompletedProcess:
    return subprocess.run([OPA, "test", "--verbose", str(path)], capture_output=True, text=True, timeout=120)


def test_the_undefined_reference_trap_example_runs(tmp_path):
    example = tmp_path / "trap.rego"
    example.write_text(block("package trap\n"))
    result = opa_test(example)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_naive_rule_misses_a_missing_id: PASS" in result.stdout
    assert "test_helper_rule_denies_a_missing_id: PASS" in result.stdout
    # And the point of it: the naive rule really does miss the call.
    naive = subprocess.run(
        [OPA, "eval", "--format", "raw", "--data", str(example), "--stdin-input", "data.trap.deny_naive"],
        input='{"subject": {}}', capture_output=True, text=True, timeout=60, check=True,
    )
    assert naive.stdout.strip() == "[]"


def test_the_writing_a_rule_example_and_its_tests_run_in_the_shipped_bundle(tmp_path):
    rego = tmp_path / "rego"
    shutil.copytree(REGO, rego)
    (rego / "sidecar" / "tickets.rego").write_text("package sidecar\n\n" + block("ticket_project_not_allowed: tool"))
    (rego / "sidecar" / "tests" / "tickets_test.rego").write_text(
        "package sidecar.tests\n\n" + block("test_ticket_project_not_allowed_denied"))
    limits = rego / "sidecar" / "limits" / "data.yaml"
    limits.write_text(limits.read_text() + "\nticket_projects: [OPS, DATA]\n")
    common = rego / "sidecar" / "common.rego"
    common.write_text(common.read_text().replace('"sql_functions": [],', '"sql_functions": [],\n\t"ticket_projects": [],'))
    result = opa_test(rego)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("test_ticket_project_not_allowed_denied", "test_ticket_project_allowed_not_denied",
                 "test_ticket_projects_come_from_data"):
        assert f"{name}: PASS" in result.stdout


def test_the_sql_facts_example_in_policy_input_is_what_the_parser_gives():
    text = (REPO / "docs" / "policy-input.md").read_text()
    section = text[text.index("### `sql`"):]
    example = json.loads("{" + re.search(r"```json\n(.*?)```", section, flags=re.S).group(1) + "}")
    query = re.search(r"\(for `(.*?)`\)", section).group(1)
    assert example["facts"]["query"] == sql_facts(query)


def test_the_trap_variants_example_runs(tmp_path):
    example = tmp_path / "trap_variants.rego"
    example.write_text(block("package trap_variants"))
    result = opa_test(example)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": PASS") == 2
    strict = subprocess.run([OPA, "check", "--strict", str(example)], capture_output=True, text=True, timeout=60)
    assert strict.returncode == 0, strict.stdout + strict.stderr


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180, cwd=cwd)


def test_the_new_tool_example_passes_its_tests_and_the_lint_and_decides_as_documented(tmp_path):
    candidate = apply_new_tool_example(shutil.copytree(REGO, tmp_path / "candidate"))
    # Before its facts are refreshed, the tests that expect a path under /exports/ to pass fail, as the doc says.
    before = cli("policy", "test", str(candidate))
    assert before.returncode == 1 and before.stdout.strip().endswith(" 2 failed"), before.stdout[-3000:]
    assert "test_export_report_allowed_for_the_data_agent" in before.stdout and "path_not_" in before.stdout
    refresh(candidate)
    tested = cli("policy", "test", "--lint", "-v", str(candidate))
    assert tested.returncode == 0, tested.stdout[-3000:]
    for name in re.findall(r"^(test_\w+) if", block("test_export_report_allowed_for_the_data_agent"), flags=re.M):
        assert "PASS sidecar/tests/export_report_test.rego" in tested.stdout and f".{name}\n" in tested.stdout + "\n"

    # The documented `check` answers: outcome, exit status and the reason shown.
    console = block("--tool export_report --args", "console")
    documented = re.findall(r"^\$ (\.venv/bin/agent-sidecar check .*?)\n(\{.*?)$",
                            console.replace("\\\n", ""), flags=re.M | re.S)
    assert [re.search(r'"outcome": "(\w+)"', shown).group(1) for _, shown in documented] == ["allow", "deny", "escalate"]
    for command, shown in documented:
        argv = shlex.split(command)[1:]
        argv[argv.index("candidate/")] = str(candidate)
        done = cli(*argv)
        answer = json.loads(done.stdout)
        outcome = re.search(r'"outcome": "(\w+)"', shown).group(1)
        assert answer["outcome"] == outcome and done.returncode == {"allow": 0, "deny": 3, "escalate": 4}[outcome]
        (reason,) = json.loads(re.search(r'"reasons": (\[.*?\])', shown).group(1))
        assert answer["reasons"] == [reason], (command, answer)
    for subject in ("spiffe://example.org/ns/agents/sa/research-agent", "spiffe://dev.local/agent"):
        done = cli("check", "--policy", str(candidate), "--subject", subject, "--source", "workload_api",
                   "--tool", "export_report", "--args", json.dumps({"report_id": "r", "destination": "/exports/r"}))
        assert done.returncode == 3 and "not_granted" in done.stdout, done.stdout


def test_a_running_sidecar_reloads_the_copy_and_says_why_it_refuses_a_change(tmp_path):
    """"Trying a change on a running sidecar": examples/dev.yaml --policy candidate/, on ports of its own."""
    candidate = apply_new_tool_example(shutil.copytree(REGO, tmp_path / "candidate"))
    refresh(candidate)
    config = yaml.safe_load((REPO / "examples" / "dev.yaml").read_text())
    config["listen"] = {"tcp": "", "unix": str(tmp_path / "s.sock")}
    config.pop("metrics", None)
    config.pop("console", None)
    config["evidence"]["dir"] = str(tmp_path / "evidence")
    (tmp_path / "dev.yaml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "serve.log").open("w+")
    server = subprocess.Popen([*CLI, "serve", "--config", str(tmp_path / "dev.yaml"), "--policy", "candidate/"],
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True)

    def wait_for(text: str, after: int = 0) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            written = (tmp_path / "serve.log").read_text()[after:]
            if text in written:
                return written
            assert server.poll() is None, written[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} in the log:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")

    def mark() -> int:
        return len((tmp_path / "serve.log").read_text())

    try:
        wait_for("serving")
        limits = candidate / "sidecar" / "limits" / "data.yaml"
        good = limits.read_text()
        at = mark()
        limits.write_text(good.replace("export_report: 0.5", "export_report: 0.4"))  # the tests pin 0.5
        written = wait_for("keeps serving", at)
        assert "policy reload of candidate rejected, revision sha256:" in written
        assert "opa test: sidecar/tests/export_report_test.rego:" in written
        wait_for("last reload rejected: opa test:", at)
        at = mark()
        limits.write_text(good)
        written = wait_for("is back to the serving revision", at)
        assert "policy candidate is back to the serving revision sha256:" in written

        risk = candidate / "sidecar" / "risk.rego"
        at = mark()
        risk.write_text(risk.read_text() + "\nunused_score if {\n\tscore := input.signals.risk_score\n\tinput.x == 1\n}\n")
        written = wait_for("keeps serving", at)
        assert "opa check --strict: sidecar/risk.rego:" in written and "assigned var score unused" in written

        at = mark()
        risk.write_text(risk.read_text().split("\nunused_score if")[0])
        limits.write_text(good.replace('export_report: ["/exports/"]', 'export_report: ["/exports/", "/archive/"]'))
        written = wait_for("policy reloaded in", at)
        assert re.search(r"policy reloaded in [0-9.]+ s: now serving revision sha256:\w+ \(was sha256:\w+;", written)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        log.close()

    # A sidecar started on a bundle that fails its tests does not start.
    limits.write_text(good.replace("export_report: 0.5", "export_report: 0.4"))
    refused = subprocess.run([*CLI, "serve", "--config", str(tmp_path / "dev.yaml"), "--policy", "candidate/"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "the policy in candidate/ cannot be served:" in refused.stderr, refused.stderr


def test_the_input_example_in_policy_input_is_what_the_sidecar_builds():
    text = (REPO / "docs" / "policy-input.md").read_text()
    example = json.loads(re.search(r"```json\n(\{\n  \"version\".*?)```", text, flags=re.S).group(1))
    tool = example["tool"]
    shipped = yaml.safe_load((REGO / "sidecar" / "catalog" / "data.yaml").read_text())["tools"][tool["name"]]
    assert tool["catalog"] == shipped
    assert tool["facts"] == argument_facts(shipped, tool["arguments"])
    schema = json.loads((REPO / "sidecar" / "policy" / "input.schema.json").read_text())
    jsonschema.validate(example, schema)


def test_a_builtin_error_passes_opa_test_but_the_sidecar_denies_it(tmp_path):
    """"Odd input never errors": opa test has no strict built-in errors; the sidecar asks OPA with them."""
    bundle = shutil.copytree(REGO, tmp_path / "bundle")
    risk = bundle / "sidecar" / "risk.rego"
    risk.write_text(risk.read_text() + '\nescalate contains "model_version_old: an old model" if {\n'
                    "\tto_number(input.signals.model_version) < 3\n}\n")
    (bundle / "sidecar" / "tests" / "model_version_test.rego").write_text(
        "package sidecar.tests\n\ntest_a_model_version_that_is_no_number_is_allowed if {\n"
        '\tdecide(mk({"signals": {"model_version": "latest"}})).outcome == "allow"\n}\n')
    assert cli("policy", "test", "--lint", str(bundle)).returncode == 0
    done = cli("check", "--policy", str(bundle), "--subject", "spiffe://dev.local/agent", "--tool", "read_file",
               "--args", '{"path": "/workspace/a.txt"}', "--signals", '{"model_version": "latest"}')
    assert done.returncode == 3, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    (reason,) = answer["reasons"]
    assert reason.startswith("policy_error: ") and "to_number: " in reason and "invalid syntax" in reason
    # The revision that failed is named, though OPA never answered a decision of it (it was "").
    assert answer["policy_revision"].startswith("sha256:")


def test_a_key_written_twice_in_a_data_file_silently_replaces_the_first(tmp_path):
    """Limits: a second `path_prefixes:` drops read_file's and write_file's prefixes; their tests catch it."""
    bundle = shutil.copytree(REGO, tmp_path / "bundle")
    limits = bundle / "sidecar" / "limits" / "data.yaml"
    limits.write_text(limits.read_text() + '\npath_prefixes:\n  export_report: ["/exports/"]\n')
    loaded = subprocess.run([OPA, "eval", "--format", "raw", "--bundle", str(bundle), "data.sidecar.limits.path_prefixes"],
                            capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0 and json.loads(loaded.stdout) == {"export_report": ["/exports/"]}, loaded.stderr
    tested = cli("policy", "test", str(bundle))
    assert tested.returncode == 1 and "FAIL sidecar/tests/arguments_test.rego" in tested.stdout


def test_the_failing_test_shown_under_running_is_what_policy_test_prints(tmp_path):
    """docs/policy-authoring.md "Running" shows `policy test` on the new tool's candidate with its rule's `>`
    mistyped as `>=`: the same FAIL lines and the same count (which grows with every test added to rego/)."""
    candidate = apply_new_tool_example(shutil.copytree(REGO, tmp_path / "candidate"))
    refresh(candidate)
    risk = candidate / "sidecar" / "risk.rego"
    assert risk.read_text().count("\tscore > threshold\n") == 1
    risk.write_text(risk.read_text().replace("\tscore > threshold\n", "\tscore >= threshold\n"))
    (shown,) = [body for kind, body in FENCED if kind == "" and body.startswith("FAIL ")]
    done = subprocess.run([*CLI, "policy", "test", "candidate/"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stdout.splitlines() == shown.splitlines(), done.stdout
