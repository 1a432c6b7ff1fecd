"""The speed targets the sidecar is held to, judged on one `bench/run.py` report.

The targets (docs/performance.md, "Against the targets"): at 1,000 calls/s no
call denied fail-closed (for timeout or overload), a p50 of at most 2.5 ms
and a p99 of at most 8 ms; a closed-loop saturation of at least 1,500
calls/s on 2 cores; at 100 calls/s a p50 of at most 3 times the bare
floor's, measured in the same run. Each identity mode is judged on its own
rows; a target whose scenario was not run is "not measured", never met.
"""

from __future__ import annotations

from typing import Callable


def _fail_closed(row: dict) -> tuple[str, bool]:
    denied = sum((row["sidecar"].get("fail_closed") or {}).values())
    return f"{denied} of {row['sidecar']['calls']}", denied == 0


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


def print_table(verdicts: list[dict]) -> None:
    print("\nAgainst the targets (docs/performance.md#against-the-targets)")
    for item in verdicts:
        met = {True: "met", False: "NOT met", None: "-"}[item["met"]]
        print(f"{item['identity']:<31} {item['target']:<32} {item['measured']:>18}  {met}")
