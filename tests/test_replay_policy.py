"""Policy replay and shadow mode, end to end: real traffic through a served sidecar, the real OPA.

The traffic is recorded by a sidecar on a copy of the shipped bundle; the
candidate is that copy with one rule added (calls from the model `gpt-test`
are denied). Replay must report exactly the recorded decisions whose outcome
that rule flips, and nothing else (an unchanged copy flips none); a shadow
sidecar running the candidate must record the same transitions live while
every answer stays what the real policy says.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource

from sidecar.client import AsyncClient
from sidecar.evidence.redaction import REDACTED, digest
from sidecar.evidence.spans import spans_for_record
from sidecar.policy.opa.service import PolicyRejected
from sidecar.server import start_sidecar
from tests.conftest import REGO

CLI = [sys.executable, "-m", "sidecar"]
NEW_RULE = (
    "package sidecar\n\n"
    'deny contains "model_blocked: calls proposed by the model gpt-test are not allowed" if {\n'
    '\tinput.signals.model == "gpt-test"\n'
    "}\n"
)
SECRET = "sk-live-4242abcd"

# (tool, arguments, signals, outcome the shipped bundle gives)
TRAFFIC = [
    ("search_docs", {"query": "quarterly report"}, {"model": "gpt-test", "risk_score": 0.1}, "allow"),
    ("search_docs", {"query": "onboarding"}, {"model": "other-model", "risk_score": 0.1}, "allow"),
    ("search_docs", {"query": "salaries"}, {"model": "gpt-test", "risk_score": 0.9}, "escalate"),
    ("search_docs", {"query": "roadmap"}, {"model": "other-model", "risk_score": 0.95}, "escalate"),
    ("read_file", {"path": "/workspace/notes/a.txt"}, {"model": "gpt-test"}, "allow"),
    ("read_file", {"path": "/etc/shadow"}, {"model": "gpt-test"}, "deny"),
    ("read_file", {"path": "/workspace/b.txt"}, {"model": "other-model", "api_key": SECRET}, "allow"),
    ("no_such_tool", {}, {"model": "gpt-test"}, "deny"),
]


def flipped(signals: dict, outcome: str) -> bool:
    """What the added rule changes: a gpt-test call that was not already denied."""
    return signals.get("model") == "gpt-test" and outcome != "deny"


def candidate_of(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    (target / "sidecar" / "model_block.rego").write_text(NEW_RULE)
    return target


def records(directory: Path, kind: str = "decision") -> list[dict]:
    out = []
    for path in sorted(directory.glob("evidence-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in out if r.get("kind") == kind]


def replay_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "policy", "replay", *args], capture_output=True, text=True, timeout=180)


async def send_traffic(sidecar) -> list:
    async with AsyncClient(sidecar.addresses[0]) as client:
        return [await client.authorize(tool, arguments, signals=signals) for tool, arguments, signals, _ in TRAFFIC]


async def record_traffic(running_sidecar, sidecar_config, bundle: Path, evidence: Path, **more) -> tuple[list, object]:
    sidecar = await running_sidecar(sidecar_config(**{"policy.dir": str(bundle), "evidence.dir": str(evidence), **more}))
    results = await send_traffic(sidecar)
    assert [r.outcome for r in results] == [t[3] for t in TRAFFIC], [(r.outcome, r.reasons) for r in results]
    return results, sidecar


async def test_replay_reports_exactly_the_decisions_the_changed_rule_flips(running_sidecar, sidecar_config, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(REGO, bundle)
    evidence = tmp_path / "evidence"
    results, sidecar = await record_traffic(running_sidecar, sidecar_config, bundle, evidence)
    await sidecar.stop()
    candidate = candidate_of(bundle, tmp_path / "candidate")
    expected = {r.decision_id: (t[3], r) for r, t in zip(results, TRAFFIC) if flipped(t[2], t[3])}
    assert 0 < len(expected) < len(TRAFFIC)

    done = replay_cli("--evidence", str(evidence), "--policy", str(candidate))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == f"{len(TRAFFIC)} replayed, {len(expected)} changed"
    changed_lines = [line for line in lines if line.startswith("  ") and " -> " in line]
    assert {line.split()[0] for line in changed_lines} == set(expected)
    for line in changed_lines:
        decision_id, tool, subject, before, _, after = line.split()
        assert (before, after) == (expected[decision_id][0], "deny")
        assert subject == "spiffe://dev.local/agent"
    # the transition table: every pair with its count
    table = {tuple(line.split()[:2]): int(line.split()[2]) for line in lines
             if len(line.split()) >= 3 and line.split()[0] in ("allow", "deny", "escalate")}
    want: dict = {}
    for _, _, signals, outcome in TRAFFIC:
        pair = (outcome, "deny" if flipped(signals, outcome) else outcome)
        want[pair] = want.get(pair, 0) + 1
    assert table == want

    as_json = replay_cli("--evidence", str(evidence), "--policy", str(candidate), "--json")
    assert as_json.returncode == 0, as_json.stderr
    objects = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {o["decision_id"] for o in objects} == set(expected)
    for o in objects:
        outcome, result = expected[o["decision_id"]]
        assert o["recorded"]["outcome"] == outcome and o["recorded"]["reasons"] == list(result.reasons)
        assert o["replayed"]["outcome"] == "deny"
        assert "model_blocked: calls proposed by the model gpt-test are not allowed" in o["replayed"]["reasons"]
    assert as_json.stderr.strip().splitlines()[-1] == f"{len(TRAFFIC)} replayed, {len(expected)} changed"

    # --fail-on: only an outcome something changed to fails
    assert replay_cli("--evidence", str(evidence), "--policy", str(candidate), "--fail-on", "allow").returncode == 0
    failing = replay_cli("--evidence", str(evidence), "--policy", str(candidate), "--fail-on", "deny")
    assert failing.returncode == 1 and "changed to deny" in failing.stderr

    # filters: one tool, a time window that holds nothing
    only = replay_cli("--evidence", str(evidence), "--policy", str(candidate), "--tool", "read_file")
    read_file = [t for t in TRAFFIC if t[0] == "read_file"]
    assert only.stdout.splitlines()[-1] == f"{len(read_file)} replayed, {sum(flipped(t[2], t[3]) for t in read_file)} changed"
    later = replay_cli("--evidence", str(evidence), "--policy", str(candidate), "--since", "2999-01-01T00:00:00Z")
    assert later.returncode == 3 and "no decision record matches" in later.stderr
    early = replay_cli("--evidence", str(evidence), "--policy", str(candidate), "--until", "2000-01-01T00:00:00Z")
    assert early.returncode == 3
    other = replay_cli("--evidence", str(evidence), "--policy", str(candidate), "--subject", "spiffe://dev.local/other")
    assert other.returncode == 3
    mine = replay_cli("--evidence", str(evidence), "--policy", str(candidate), "--subject", "spiffe://dev.local/agent",
                      "--since", "1h", "--until", "2999-01-01T00:00:00Z")
    assert mine.stdout.splitlines()[-1] == f"{len(TRAFFIC)} replayed, {len(expected)} changed"


async def test_replay_of_the_same_bundle_changes_nothing(running_sidecar, sidecar_config, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(REGO, bundle)
    evidence = tmp_path / "evidence"
    _, sidecar = await record_traffic(running_sidecar, sidecar_config, bundle, evidence)
    await sidecar.stop()
    same = tmp_path / "same"
    shutil.copytree(bundle, same)
    done = replay_cli("--evidence", str(evidence), "--policy", str(same), "--fail-on", "allow", "--fail-on", "deny",
                      "--fail-on", "escalate")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == f"{len(TRAFFIC)} replayed, 0 changed"


async def test_the_record_carries_the_input_with_digests_for_what_must_not_be_clear(
    running_sidecar, sidecar_config, tmp_path
):
    evidence = tmp_path / "evidence"
    sidecar = await running_sidecar(sidecar_config(**{"evidence.dir": str(evidence)}))
    async with AsyncClient(sidecar.addresses[0]) as client:
        low = await client.authorize("read_file", {"path": "/workspace/b.txt"},
                                     signals={"model": "m", "api_key": SECRET, "note": f"password={SECRET}"})
        medium = await client.authorize("write_file", {"path": "/workspace/out.txt", "content": "x"})
        await client.authorize("read_file", {"path": "/workspace/c.txt"}, call_id="call-1")
        refused = await client.authorize("read_file", {"path": "/workspace/d.txt"}, call_id="call-1")
    assert refused.reasons[0].startswith("call_id_reused")  # refused before policy
    by_id = {r["decision_id"]: r for r in records(evidence)}
    record = by_id[low.decision_id]
    document = record["input"]
    assert document["version"] == "sidecar/v1"
    assert document["subject"]["spiffe_id"] == "spiffe://dev.local/agent"
    assert document["tool"]["arguments"] == {"path": "/workspace/b.txt"}  # a low-risk tool's arguments: in clear
    assert document["signals"]["api_key"] == digest(SECRET) and record["signals"]["api_key"] == REDACTED
    assert document["signals"]["note"] == digest(f"password={SECRET}")  # a string holding a secret: digested whole
    assert SECRET not in json.dumps(record)
    assert {"input.signals.api_key", "input.signals.note", "signals.api_key"} <= set(record["redacted"])
    assert document["usage"]["calls_in_window"] >= 1 and document["request"]["time"] == record["time"]
    assert record["policy_revision"].startswith("sha256:")
    # arguments not recorded in clear: each value a digest, the shape kept
    write = by_id[medium.decision_id]
    assert "arguments" not in write
    assert write["input"]["tool"]["arguments"] == {"path": digest("/workspace/out.txt"), "content": digest("x")}
    # nothing was sent to OPA: no input
    assert "input" not in by_id[refused.decision_id]


async def test_past_the_leaf_budget_digested_arguments_are_one_digest(running_sidecar, sidecar_config, tmp_path):
    """A digest (71 characters) per small value made a record many times the call: past
    MAX_DIGESTED_LEAVES values the arguments are recorded as the one digest of the whole."""
    from sidecar.evidence.records import MAX_DIGESTED_LEAVES

    evidence = tmp_path / "evidence"
    sidecar = await running_sidecar(sidecar_config(**{"evidence.dir": str(evidence)}))
    within = {"path": "/workspace/out.txt", "content": "x", "lines": list(range(MAX_DIGESTED_LEAVES - 2))}
    past = {"path": "/workspace/out.txt", "content": "x", "lines": list(range(50_000))}
    async with AsyncClient(sidecar.addresses[0]) as client:
        kept = await client.authorize("write_file", within)
        whole = await client.authorize("write_file", past)
    by_id = {r["decision_id"]: r for r in records(evidence)}
    shaped = by_id[kept.decision_id]["input"]["tool"]["arguments"]
    assert shaped["lines"][7] == digest(7) and len(shaped["lines"]) == MAX_DIGESTED_LEAVES - 2  # one by one, shape kept
    record = by_id[whole.decision_id]
    assert "arguments" not in record
    assert record["input"]["tool"]["arguments"] == record["arguments_digest"] == digest(past)
    assert len(json.dumps(record)) < 20_000  # not 50,000 digests


async def test_replay_refuses_what_it_cannot_replay(running_sidecar, sidecar_config, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(REGO, bundle)
    evidence = tmp_path / "evidence"
    _, sidecar = await record_traffic(running_sidecar, sidecar_config, bundle, evidence)
    await sidecar.stop()

    empty = tmp_path / "empty"
    empty.mkdir()
    done = replay_cli("--evidence", str(empty), "--policy", str(bundle))
    assert done.returncode == 3 and "no evidence log" in done.stderr

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "sidecar" / "oops.rego").write_text("package sidecar\n\nallow contains x if {\n")
    done = replay_cli("--evidence", str(evidence), "--policy", str(broken))
    assert done.returncode == 2 and "is refused; nothing replayed" in done.stderr and "oops.rego" in done.stderr
    assert "replayed" not in done.stdout

    # records from before replayable evidence: no `input` (the chain no longer verifies after the edit)
    old = tmp_path / "old"
    shutil.copytree(evidence, old)
    for path in old.glob("evidence-*.jsonl"):
        lines = []
        for line in path.read_text().splitlines():
            record = json.loads(line)
            record.pop("input", None)
            lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")))
        path.write_text("\n".join(lines) + "\n")
    done = replay_cli("--evidence", str(old), "--policy", str(bundle))
    assert done.returncode == 4 and "fails verification" in done.stderr
    done = replay_cli("--evidence", str(old), "--policy", str(bundle), "--no-verify")
    policy_decided = sum(1 for t in TRAFFIC)  # every call of TRAFFIC reached policy
    assert done.returncode == 3, done.stderr
    assert f"{policy_decided} recorded before replayable evidence (no input)" in done.stderr


async def test_shadow_records_the_same_transitions_without_changing_an_answer(running_sidecar, sidecar_config, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(REGO, bundle)
    real, sidecar = await record_traffic(running_sidecar, sidecar_config, bundle, tmp_path / "plain")
    await sidecar.stop()
    candidate = candidate_of(bundle, tmp_path / "candidate")
    shadowed, sidecar = await record_traffic(
        running_sidecar, sidecar_config, bundle, tmp_path / "evidence", **{"policy.shadow_dir": str(candidate)}
    )
    # every answer is the real policy's
    assert [(r.outcome, r.reasons, r.obligations) for r in shadowed] == [(r.outcome, r.reasons, r.obligations) for r in real]
    by_id = {r["decision_id"]: r for r in records(tmp_path / "evidence")}
    shadow_revision = sidecar.shadow.revision
    assert shadow_revision != sidecar.policy.revision
    transitions = {}
    for result, (_, _, signals, outcome) in zip(shadowed, TRAFFIC):
        shadow = by_id[result.decision_id]["shadow"]
        assert shadow["revision"] == shadow_revision and "error" not in shadow
        assert shadow["outcome"] == ("deny" if flipped(signals, outcome) else outcome)
        assert by_id[result.decision_id]["outcome"] == outcome
        transitions[(outcome, shadow["outcome"])] = transitions.get((outcome, shadow["outcome"]), 0) + 1
    # the metrics count each pair
    metric = sidecar.metrics.registry.get_sample_value
    for (recorded, shadow), count in transitions.items():
        assert metric("sidecar_shadow_decisions_total", {"recorded": recorded, "shadow": shadow}) == count
    # the span carries the same attributes
    record = by_id[shadowed[0].decision_id]
    (span, *_) = spans_for_record(record, lambda name: Resource.create({"service.name": name}))
    assert span.attributes["sidecar.shadow.outcome"] == "deny"
    assert span.attributes["sidecar.shadow.revision"] == shadow_revision
    assert "model_blocked: calls proposed by the model gpt-test are not allowed" in span.attributes["sidecar.shadow.reasons"]
    # and replay of the shadow sidecar's own log reports the same flips
    await sidecar.stop()
    done = replay_cli("--evidence", str(tmp_path / "evidence"), "--policy", str(candidate), "--json")
    assert {json.loads(line)["decision_id"] for line in done.stdout.splitlines()} == {
        r.decision_id for r, t in zip(shadowed, TRAFFIC) if flipped(t[2], t[3])
    }


async def test_a_stopped_shadow_never_changes_the_answer(running_sidecar, sidecar_config, tmp_path):
    candidate = candidate_of(REGO, tmp_path / "candidate")
    sidecar = await running_sidecar(sidecar_config(**{
        "policy.shadow_dir": str(candidate), "policy.shadow_timeout_ms": 30,
        "evidence.dir": str(tmp_path / "evidence"),
    }))
    pid = sidecar.shadow.runner.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        async with AsyncClient(sidecar.addresses[0]) as client:
            result = await client.authorize("search_docs", {"query": "q"}, signals={"model": "gpt-test"})
    finally:
        os.kill(pid, signal.SIGCONT)
    assert result.outcome == "allow"  # the candidate would deny; it is never enforced, and it did not answer
    (record,) = [r for r in records(tmp_path / "evidence") if r["decision_id"] == result.decision_id]
    assert record["outcome"] == "allow"
    assert record["shadow"]["error"].startswith("policy_timeout")
    assert sidecar.metrics.registry.get_sample_value("sidecar_shadow_errors_total") == 1


async def test_a_rejected_shadow_reload_says_shadow_and_names_the_first_problems(running_sidecar, sidecar_config,
                                                                               tmp_path, caplog):
    """Which bundle did not change, in one short line: 14 failing tests once made one of several KB."""
    import logging

    candidate = tmp_path / "candidate"
    shutil.copytree(REGO, candidate)
    sidecar = await running_sidecar(sidecar_config(**{
        "policy.shadow_dir": str(candidate), "policy.reload": True, "evidence.dir": str(tmp_path / "evidence"),
    }))
    caplog.set_level(logging.DEBUG, logger="sidecar.policy.opa.service")
    failing = [f"test_broken_{i:02d}" for i in range(14)]
    (candidate / "sidecar" / "tests" / "broken_test.rego").write_text(
        "package sidecar.tests\n\n" + "".join(f"{name} if false\n\n" for name in failing))
    deadline = time.monotonic() + 60
    while not sidecar.shadow.last_reload_error and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    error = sidecar.shadow.last_reload_error or ""
    assert error.startswith("opa test: sidecar/tests/broken_test.rego:3: data.sidecar.tests.test_broken_00 failed; ")
    assert [name for name in failing if name in error] == failing[:3], error
    assert error.endswith(f"; and 12 more (`agent-sidecar policy test {candidate}` lists them)"), error
    (line,) = [r for r in caplog.records if r.levelno == logging.ERROR and "rejected" in r.getMessage()]
    message = line.getMessage()
    assert message.startswith(f"shadow policy reload of {candidate} rejected, revision {sidecar.shadow.revision} "
                              "keeps serving:"), message
    assert [name for name in failing if name in message] == failing[:3] and "and 12 more" in message
    (everything,) = [r for r in caplog.records if r.levelno == logging.DEBUG and "every problem" in r.getMessage()]
    assert all(name in everything.getMessage() for name in failing)
    await sidecar.health.refresh()
    _, detail = sidecar.health.snapshot()
    assert "and 12 more" in detail.split("shadow: ", 1)[1] and len(detail) < 2000, detail


async def test_the_shadow_bundle_hot_reloads_behind_the_same_test_gate(running_sidecar, sidecar_config, tmp_path):
    candidate = tmp_path / "candidate"
    shutil.copytree(REGO, candidate)
    sidecar = await running_sidecar(sidecar_config(**{
        "policy.shadow_dir": str(candidate), "policy.reload": True, "evidence.dir": str(tmp_path / "evidence"),
    }))
    before = sidecar.shadow.revision

    async def shadow_of(client) -> dict:
        result = await client.authorize("search_docs", {"query": "q"}, signals={"model": "gpt-test"})
        assert result.outcome == "allow"
        (record,) = [r for r in records(tmp_path / "evidence") if r["decision_id"] == result.decision_id]
        return record["shadow"]

    async with AsyncClient(sidecar.addresses[0]) as client:
        assert (await shadow_of(client))["outcome"] == "allow"
        # a change whose tests fail is rejected: the previous shadow revision keeps deciding
        (candidate / "sidecar" / "tests" / "broken_test.rego").write_text("package sidecar.tests\n\ntest_broken if false\n")
        deadline = time.monotonic() + 60
        while not sidecar.shadow.last_reload_error and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert "test_broken" in (sidecar.shadow.last_reload_error or "")
        assert sidecar.shadow.revision == before
        await sidecar.health.refresh()
        serving, detail = sidecar.health.snapshot()
        assert serving and "shadow: ok (never enforced; deciding; serving revision" in detail
        assert "last reload rejected" in detail.split("shadow: ", 1)[1]
        (candidate / "sidecar" / "tests" / "broken_test.rego").unlink()
        (candidate / "sidecar" / "model_block.rego").write_text(NEW_RULE)
        while sidecar.shadow.revision == before and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert sidecar.shadow.revision != before
        shadow = await shadow_of(client)
        assert shadow["outcome"] == "deny" and shadow["revision"] == sidecar.shadow.revision
    assert sidecar.policy.revision == before  # the real policy is untouched


async def test_a_shadow_bundle_that_fails_its_tests_refuses_the_start(sidecar_config, tmp_path):
    candidate = tmp_path / "candidate"
    shutil.copytree(REGO, candidate)
    (candidate / "sidecar" / "tests" / "broken_test.rego").write_text("package sidecar.tests\n\ntest_broken if false\n")
    with pytest.raises(PolicyRejected) as refused:
        await start_sidecar(sidecar_config(**{"policy.shadow_dir": str(candidate)}))
    assert all(p.startswith(f"policy.shadow_dir {candidate}: ") for p in refused.value.problems)
    assert any("test_broken" in p for p in refused.value.problems)


async def test_replay_and_shadow_see_the_candidates_catalog(running_sidecar, sidecar_config, tmp_path):
    """A candidate that changes a tool's catalog entry (search_docs becomes high risk) escalates its calls."""
    bundle = tmp_path / "bundle"
    shutil.copytree(REGO, bundle)
    candidate = tmp_path / "candidate"
    shutil.copytree(bundle, candidate)
    catalog = candidate / "sidecar" / "catalog" / "data.yaml"
    text = catalog.read_text()
    assert "  search_docs:\n    risk: low" in text
    catalog.write_text(text.replace("  search_docs:\n    risk: low", "  search_docs:\n    risk: high", 1))
    results, sidecar = await record_traffic(running_sidecar, sidecar_config, bundle, tmp_path / "evidence",
                                            **{"policy.shadow_dir": str(candidate)})
    await sidecar.stop()
    expected = {r.decision_id for r, t in zip(results, TRAFFIC) if t[0] == "search_docs" and t[3] == "allow"}
    assert expected
    by_id = {r["decision_id"]: r for r in records(tmp_path / "evidence")}
    assert {i for i, r in by_id.items() if r["shadow"]["outcome"] != r["outcome"]} == expected
    done = replay_cli("--evidence", str(tmp_path / "evidence"), "--policy", str(candidate), "--json",
                      "--fail-on", "escalate")
    assert done.returncode == 1
    objects = [json.loads(line) for line in done.stdout.splitlines()]
    assert {o["decision_id"] for o in objects} == expected
    assert all(o["replayed"]["outcome"] == "escalate" for o in objects)


async def test_replay_marks_a_change_decided_on_digested_arguments(running_sidecar, sidecar_config, tmp_path):
    # write_file is medium risk: its arguments (and their path facts) are recorded as digests, so replaying even
    # the bundle that decided reads a digest as the path and denies: the change is the replay's, and says so.
    bundle = tmp_path / "bundle"
    shutil.copytree(REGO, bundle)
    evidence = tmp_path / "evidence"
    sidecar = await running_sidecar(sidecar_config(**{"policy.dir": str(bundle), "evidence.dir": str(evidence)}))
    async with AsyncClient(sidecar.addresses[0]) as client:
        write = await client.authorize("write_file", {"path": "/workspace/out.txt", "content": "x"})
        read = await client.authorize("read_file", {"path": "/workspace/a.txt"})
    assert (write.outcome, read.outcome) == ("allow", "allow")
    await sidecar.stop()

    done = replay_cli("--evidence", str(evidence), "--policy", str(bundle))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "2 replayed, 1 changed"
    at = next(i for i, line in enumerate(lines) if line.startswith(f"  {write.decision_id}"))
    assert lines[at].split()[-3:] == ["allow", "->", "deny"]
    assert lines[at + 3].strip().startswith("(arguments recorded as digests")
    as_json = replay_cli("--evidence", str(evidence), "--policy", str(bundle), "--json")
    (changed,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert changed["decision_id"] == write.decision_id and changed["arguments_digested"] is True
