"""The speed targets the sidecar is held to, judged on one `bench/run.py` report.

The targets (docs/performance.md, "Against the targets"): at 1,000 calls/s no
call denied fail-closed (for timeout or overload) nor refused by gRPC, a p50 of at most 2.5 ms
and a p99 of at most 8 ms; a closed-loop saturation of at least 1,500
calls/s on 2 cores; at 100 calls/s a p50 of at most 3 times the bare
floor's, measured in the same run. Each identity mode is judged on its own
rows; a target whose scenario was not run is "not measured", never met.

`fixed_hops` says what the 100/s ratio leaves to the sidecar's own code on
the machine of the run: the hops every decision makes whatever that code
does (gRPC, OPA, the durable record), each measured from idle.
"""

from __future__ import annotations

from typing import Callable


def _fail_closed(row: dict) -> tuple[str, bool]:
    """Denied fail-closed by the sidecar, and refused by gRPC before the sidecar took them (past
    `listen.max_pending_calls`: overload too, though unrecorded): both count against the target."""
    denied = sum((row["sidecar"].get("fail_closed") or {}).values())
    refused = row["sidecar"].get("errors", 0)
    measured = f"{denied} of {row['sidecar']['calls']}" + (f", {refused} refused by gRPC" if refused else "")
    return measured, denied == 0 and refused == 0


def _p50(row: dict) -> tuple[str, bool]:
    value = row["sidecar"]["latency_ms"]["p50"]
    return f"{value:.2f} ms", value <= 2.5


def _p99(row: dict) -> tuple[str, bool]:
    value = row["sidecar"]["latency_ms"]["p99"]
    return f"{value:.2f} ms", value <= 8.0


def _saturation(row: dict) -> tuple[str, bool]:
    value = row["sidecar"]["throughput"]
    return f"{value:,.0f} calls/s", value >= 1500


def _ratio(row: dict) -> tuple[str, bool]:
    value = row["sidecar"]["latency_ms"]["p50"] / row["floor"]["latency_ms"]["p50"]
    return f"{value:.2f}x", value <= 3.0


# (target, the scenario it is judged on, (what was measured, met?) from that scenario's row)
TARGETS: list[tuple[str, str, Callable[[dict], tuple[str, bool]]]] = [
    ("1,000/s: no fail-closed deny", "open 1000/s", _fail_closed),
    ("1,000/s: p50 <= 2.5 ms", "open 1000/s", _p50),
    ("1,000/s: p99 <= 8 ms", "open 1000/s", _p99),
    ("closed loop >= 1,500 calls/s", "closed x64", _saturation),
    ("100/s: p50 <= 3x the floor's", "open 100/s", _ratio),
]


def judge(results: list[dict]) -> list[dict]:
    """One verdict per identity mode and target: {"identity", "target", "measured", "met"}, where `met`
    is True, False, or None (the scenario was not run). `results` is bench/run.py's report["results"]."""
    rows = {(row["identity"], row["scenario"]): row for row in results}
    verdicts = []
    for identity in dict.fromkeys(row["identity"] for row in results):
        for target, scenario, measure in TARGETS:
            row = rows.get((identity, scenario))
            measured, met = measure(row) if row is not None else ("not measured", None)
            verdicts.append({"identity": identity, "target": target, "measured": measured, "met": met})
    return verdicts


def fixed_hops(results: list[dict], opa_wakeup: dict, durable_write: dict) -> list[dict]:
    """The least a call at 100 calls/s can take, per identity mode, in ms: the floor's p50 (the client and
    gRPC), OPA's round trip from idle (bench/opa_wakeup.py: the default batch scheduling, a request every
    10 ms) and one durable write from idle (bench/durable_write.py, every 10 ms), none of them the
    sidecar's own code. [{"identity", "floor_ms", "opa_ms", "write_ms", "sum_ms", "ratio"}], `ratio` being
    the sum over the floor's p50: what is left of the 3x target for everything else."""
    opa_ms = opa_wakeup["batch"]["every 10 ms"]["round_trip_p50_us"] / 1000
    write_ms = durable_write["every 10 ms"]["p50_us"] / 1000
    bounds = []
    for row in results:
        if row["scenario"] != "open 100/s":
            continue
        floor_ms = row["floor"]["latency_ms"]["p50"]
        total = floor_ms + opa_ms + write_ms
        bounds.append({"identity": row["identity"], "floor_ms": round(floor_ms, 3), "opa_ms": round(opa_ms, 3),
                       "write_ms": round(write_ms, 3), "sum_ms": round(total, 3), "ratio": round(total / floor_ms, 2)})
    return bounds


def print_table(verdicts: list[dict], hops: list[dict] | None = None) -> None:
    print("\nAgainst the targets (docs/performance.md#against-the-targets)")
    for item in verdicts:
        met = {True: "met", False: "NOT met", None: "-"}[item["met"]]
        print(f"{item['identity']:<31} {item['target']:<32} {item['measured']:>18}  {met}")
    for bound in hops or []:
        print(f"{bound['identity']:<31} 100/s, the fixed hops alone: floor {bound['floor_ms']:.2f} + OPA from idle "
              f"{bound['opa_ms']:.2f} + durable write from idle {bound['write_ms']:.2f} = {bound['sum_ms']:.2f} ms, "
              f"{bound['ratio']:.2f}x the floor's")
