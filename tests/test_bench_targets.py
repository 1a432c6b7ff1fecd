"""bench/targets.py judges a bench report against the speed targets: each bound is met at its
value and missed just past it, fail-closed denies of any kind count, each identity mode is
judged on its own rows, and a scenario that was not run is never reported as met."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from targets import fixed_hops, judge  # noqa: E402


def row(identity: str, scenario: str, *, p50: float = 1.0, p99: float = 4.0, floor_p50: float = 0.5,
        throughput: float = 1000.0, fail_closed: dict | None = None, errors: int = 0) -> dict:
    return {"identity": identity, "scenario": scenario,
            "floor": {"latency_ms": {"p50": floor_p50, "p99": 1.0}},
            "sidecar": {"latency_ms": {"p50": p50, "p99": p99}, "throughput": throughput, "calls": 5000,
                        "fail_closed": fail_closed or {}, "errors": errors}}


def verdicts(results: list[dict], identity: str = "unix") -> dict[str, bool | None]:
    return {v["target"]: v["met"] for v in judge(results) if v["identity"] == identity}


def test_each_bound_is_met_at_its_value_and_missed_past_it():
    at = [row("unix", "open 1000/s", p50=2.5, p99=8.0), row("unix", "closed x64", throughput=1500),
          row("unix", "open 100/s", p50=1.5, floor_p50=0.5)]
    past = [row("unix", "open 1000/s", p50=2.51, p99=8.01), row("unix", "closed x64", throughput=1499),
            row("unix", "open 100/s", p50=1.51, floor_p50=0.5)]
    assert all(verdicts(at).values()) and len(verdicts(at)) == 5
    assert verdicts(past) == {"1,000/s: no fail-closed deny": True, "1,000/s: p50 <= 2.5 ms": False,
                              "1,000/s: p99 <= 8 ms": False, "closed loop >= 1,500 calls/s": False,
                              "100/s: p50 <= 3x the floor's": False}


def test_any_fail_closed_deny_at_1000_per_second_misses_and_is_counted():
    for denies in ({"overloaded": 1}, {"policy_timeout": 2, "policy_unavailable": 3}):
        (fast,) = [v for v in judge([row("unix", "open 1000/s", fail_closed=denies)])
                   if v["target"] == "1,000/s: no fail-closed deny"]
        assert fast["met"] is False and fast["measured"] == f"{sum(denies.values())} of 5000"


def test_calls_grpc_refused_past_max_pending_calls_miss_the_target_too():
    """Refused before the sidecar took them (listen.max_pending_calls): overload, though unrecorded."""
    (fast,) = [v for v in judge([row("unix", "open 1000/s", errors=679)])
               if v["target"] == "1,000/s: no fail-closed deny"]
    assert fast["met"] is False and fast["measured"] == "0 of 5000, 679 refused by gRPC"


def test_modes_are_judged_apart_and_an_unrun_scenario_is_not_met():
    results = [row("unix", "open 1000/s", p50=2.0), row("mtls", "open 1000/s", p50=3.0)]
    assert verdicts(results, "unix")["1,000/s: p50 <= 2.5 ms"] is True
    assert verdicts(results, "mtls")["1,000/s: p50 <= 2.5 ms"] is False
    assert verdicts(results, "unix")["closed loop >= 1,500 calls/s"] is None
    assert verdicts(results, "mtls")["100/s: p50 <= 3x the floor's"] is None


def test_fixed_hops_add_the_floor_opa_from_idle_and_a_durable_write_per_mode():
    """The 100/s rows only, each with its own floor; OPA's figure is the default (batch) scheduling's
    round trip every 10 ms, the write's its p50 every 10 ms, both from microseconds to ms."""
    results = [row("unix", "open 100/s", floor_p50=0.5), row("mtls", "open 100/s", floor_p50=0.4),
               row("unix", "open 1000/s")]
    wakeup = {"normal": {"every 10 ms": {"round_trip_p50_us": 9000.0}},
              "batch": {"every 10 ms": {"round_trip_p50_us": 700.0}, "every 1 ms": {"round_trip_p50_us": 1.0}}}
    writes = {"every 10 ms": {"p50_us": 300.0}, "every 1 ms": {"p50_us": 1.0}}
    assert fixed_hops(results, wakeup, writes) == [
        {"identity": "unix", "floor_ms": 0.5, "opa_ms": 0.7, "write_ms": 0.3, "sum_ms": 1.5, "ratio": 3.0},
        {"identity": "mtls", "floor_ms": 0.4, "opa_ms": 0.7, "write_ms": 0.3, "sum_ms": 1.4, "ratio": 3.5},
    ]
