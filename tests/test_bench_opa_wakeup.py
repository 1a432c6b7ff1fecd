"""bench/opa_wakeup.py against the real OPA: its requests are the decisions the sidecar would ask for,
and its figures come from both scheduling policies of the sidecar's own OPA runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sidecar.policy.opa.runner import find_opa
from tests.conftest import REGO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import opa_wakeup  # noqa: E402


def test_its_requests_are_decided_as_the_bench_mix_is(tmp_path):
    """Each request's input document, evaluated by `opa eval` on the shipped bundle: allowed, denied and
    escalated calls are all there, so the OPA it wakes does a real decision's work."""
    outcomes = set()
    for request in opa_wakeup.decision_requests(REGO, count=20):
        head, _, body = request.partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v1/data/sidecar/decision HTTP/1.1\r\n")
        assert f"Content-Length: {len(body)}".encode() in head
        (tmp_path / "input.json").write_bytes(json.dumps(json.loads(body)["input"]).encode())
        done = subprocess.run([find_opa(), "eval", "--format", "json", "--bundle", str(REGO), "--input",
                               str(tmp_path / "input.json"), "data.sidecar.decision"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        outcomes.add(json.loads(done.stdout)["result"][0]["expressions"][0]["value"]["outcome"])
    assert outcomes == {"allow", "deny", "escalate"}


def test_it_measures_both_policies_at_both_pauses():
    figures = opa_wakeup.measure(REGO, 5)
    assert set(figures) == {"normal", "batch"}
    for by_gap in figures.values():
        assert set(by_gap) == {f"every {gap:g} ms" for gap in opa_wakeup.GAPS_MS}
        for row in by_gap.values():
            assert 0 < row["send_p50_us"] < row["round_trip_p50_us"], row
