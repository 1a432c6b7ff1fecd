"""The examples in docs/policy-authoring.md (with the real OPA) and docs/policy-input.md run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

from sidecar.policy.facts.sql import sql_facts
from tests.conftest import REGO, REPO

OPA = str(REPO / ".tools" / "bin" / "opa")
DOC = (REPO / "docs" / "policy-authoring.md").read_text()
BLOCKS = re.findall(r"```rego\n(.*?)```", DOC, flags=re.S)


def block(containing: str) -> str:
    (found,) = [b for b in BLOCKS if containing in b]
    return found


def opa_test(path) -> subprocess.CompletedProcess:
    return subprocess.run([OPA, "test", "--verbose", str(path)], capture_output=True, text=True, timeout=120)


def test_the_undefined_reference_trap_example_runs(tmp_path):
    example = tmp_path / "trap.rego"
    example.write_text(block("package trap"))
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
