"""`make demo` (scripts/demo.py) runs the real SPIRE, Jaeger and sidecar, every outcome, and leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from sidecar.evidence.verify import verify_dir
from tests.conftest import REPO
from tests.doubles.escalation import records
from tests.infra import spire
from tests.infra.jaeger import find_binary

DEMO = [sys.executable, str(REPO / "scripts" / "demo.py"), "--query-port", "0"]
CALL_LINE = re.compile(r"^  (allow|deny|escalate) +(\S+) .*\n +trace ([0-9a-f]{32}) +(http://\S+) +\[(.+)\]$", re.M)


def demo_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def pids(output: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"^demo: (jaeger|sidecar) pid (\d+)", output, re.M)}


def spire_dir(output: str) -> str:
    (directory,) = re.findall(r"^demo: SPIRE runs in (\S+);", output, re.M)
    return directory


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text` (the SPIRE processes name their directory)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found


def tools_built() -> None:
    """A missing binary fails here, with the message that says `make install` builds it."""
    find_binary()
    spire.binary("spire-server")
    spire.binary("spire-agent")


def test_demo_once_shows_each_outcome_in_jaeger_and_verifies_the_evidence(tmp_path):
    tools_built()
    run = subprocess.run([*DEMO, "--once", "--dir", str(tmp_path / "demo")], capture_output=True, text=True,
                         timeout=600, env=demo_env(), cwd=REPO)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output

    calls = CALL_LINE.findall(output)
    assert [(outcome, tool) for outcome, tool, *_ in calls] == [
        ("allow", "read_file"), ("allow", "http_get"), ("deny", "read_file"), ("deny", "rm_rf_everything"),
        ("escalate", "send_email"), ("allow", "send_email"),
    ], output
    assert all(mark == "ok" for *_, mark in calls)
    escalated, retried = calls[4], calls[5]
    assert escalated[2] == retried[2], "the escalated call and its approved retry share one trace"
    assert all(url.endswith(f"/api/traces/{trace}") for _, _, trace, url, _ in calls)
    assert "has every trace" in output
    approver = re.search(r"retry after (spiffe://example\.org/\S+) approved", output)
    assert approver and approver[1] == "spiffe://example.org/ns/ops/sa/approver", output
    assert "trust anchors: --bundle" in output and "INTACT" in output
    assert "signed by: spiffe://example.org/ns/agents/sa/ops-agent" in output

    evidence = tmp_path / "demo" / "evidence"
    assert verify_dir(evidence).ok
    kinds = [r["kind"] for r in records(evidence)]
    assert {"decision", "escalation", "approval", "checkpoint"} <= set(kinds)
    decisions = [r for r in records(evidence) if r["kind"] == "decision"]
    assert {r["trace_id"] for r in decisions} == {c[2] for c in calls}
    # the caller is the pod's identity, issued by SPIRE to the sidecar's process
    assert {(r["subject"]["spiffe_id"], r["subject"]["source"]) for r in decisions} == {
        ("spiffe://example.org/ns/agents/sa/ops-agent", "workload_api")}
    (approval,) = [r for r in records(evidence) if r["kind"] == "approval"]
    assert approval["approver"] == "spiffe://example.org/ns/ops/sa/approver"
    started = pids(output)
    assert set(started) == {"jaeger", "sidecar"} and all(gone(pid) for pid in started.values())
    assert not processes_mentioning(spire_dir(output)), "a SPIRE process outlived the demo"


def test_demo_stops_everything_on_ctrl_c(tmp_path):
    tools_built()
    demo = subprocess.Popen([*DEMO, "--dir", str(tmp_path / "demo")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=demo_env(), cwd=REPO)
    lines = []
    try:
        for line in demo.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        started = pids("".join(lines))
        assert set(started) == {"jaeger", "sidecar"}, "".join(lines)
        assert not any(gone(pid) for pid in started.values())
        assert processes_mentioning(spire_dir("".join(lines))), "SPIRE is not running"
        demo.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        rest, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    output = "".join(lines) + rest
    assert demo.returncode == 0, output
    assert "demo: stopping" in output and "INTACT" in output
    assert all(gone(pid) for pid in started.values())
    assert not processes_mentioning(spire_dir(output)), "a SPIRE process outlived the demo"


def test_demo_empties_only_a_directory_it_made(tmp_path):
    """--dir is emptied at start: a mistyped one (the checkout, a home directory) must be refused untouched."""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    for where, why in ((tmp_path / "work", "it holds files and no .agent-sidecar-demo (a directory an earlier demo made)"),
                       (tmp_path / "a-file", "not a directory")):
        run = subprocess.run([*DEMO, "--once", "--dir", str(where)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and run.stdout == "", run
        assert run.stderr == f"demo: --dir {where}: {why}, so it is not emptied; give a new or empty directory\n"
    assert (tmp_path / "work" / "notes.txt").read_text() == (tmp_path / "a-file").read_text() == "mine"
