"""Past saturation the sidecar fails closed fast (issue 10): while its event loop runs late, calls are
denied at once with `overloaded`, before policy, and recorded; the call id is not used up.

The saturation here is made on the very loop the sidecar serves on: tasks that each hold the loop for
5 ms between awaits, as a saturated sidecar's own calls do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from sidecar.client import AsyncClient
from sidecar.overload import LoopLag


async def until(condition, what: str, timeout: float = 30.0) -> None:
    """Until `condition()` holds (polled), or fail after a deadline generous for a loaded machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never in {timeout:.0f} s: {what}"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def saturated_loop(tasks: int = 40, lag: LoopLag | None = None):
    """Every lap of the event loop takes about tasks * 5 ms while inside. With `lag`, entered once
    `lag` has seen tick after tick late (a loaded machine may need more than two laps in 0.5 s)."""
    running = True

    async def busy() -> None:
        while running:
            time.sleep(0.005)
            await asyncio.sleep(0)

    workers = [asyncio.create_task(busy()) for _ in range(tasks)]
    if lag is not None:
        await until(lambda: lag.refusal() is not None, "the ticker found the loop late twice in a row")
    else:
        await asyncio.sleep(0.5)  # the ticker has fired late at least once
    try:
        yield
    finally:
        running = False
        await asyncio.gather(*workers)


def records(directory: Path) -> list[dict]:
    out: list[dict] = []
    for path in sorted(directory.glob("evidence-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


async def test_the_lag_is_measured_and_refused_only_while_the_loop_runs_late():
    lag = LoopLag(max_lag_seconds=0.05, interval_seconds=0.01)
    assert lag.refusal() is None  # not started: sheds nothing
    async with lag:
        await asyncio.sleep(0.05)
        assert lag.refusal() is None and lag.lag() < 0.05
        time.sleep(0.2)  # one stall, over by the time a call is handled: sheds nothing
        await asyncio.sleep(0)
        assert lag.refusal() is None
        async with saturated_loop(lag=lag):  # every lap ~200 ms: tick after tick is late
            refusal = lag.refusal()
            assert refusal is not None and refusal.startswith("overloaded: the sidecar is saturated (its event loop runs ")
            assert "over 50 ms); denied at once instead of queueing" in refusal
        await until(lambda: lag.refusal() is None, "ticks came on time again")  # polled, not 0.1 s
    assert lag.refusal() is None  # closed: sheds nothing


async def test_a_saturated_sidecar_denies_at_once_records_it_and_recovers(running_sidecar, sidecar_config, tmp_path):
    sidecar = await running_sidecar(sidecar_config(**{"sidecar.overload_lag_ms": 50}))
    async with AsyncClient(sidecar.addresses[0]) as client:
        assert (await client.authorize("search_docs", {"query": "q"})).outcome == "allow"
        async with saturated_loop(lag=sidecar.overload):
            shed = await client.authorize("search_docs", {"query": "q"}, call_id="call-under-load")
        assert shed.outcome == "deny", shed
        assert shed.reasons[0].startswith("overloaded: the sidecar is saturated"), shed.reasons
        await until(lambda: sidecar.overload.refusal() is None, "the sidecar's loop on time again")  # not 0.1 s
        again = await client.authorize("search_docs", {"query": "q"}, call_id="call-under-load")
        assert again.outcome == "allow", again.reasons  # the call id was not used up by the shed call
    written = [r for r in records(tmp_path / "evidence") if r["kind"] == "decision"]
    shed_record = next(r for r in written if r["decision_id"] == shed.decision_id)
    assert shed_record["outcome"] == "deny" and shed_record["reasons"] == list(shed.reasons)
    assert "input" not in shed_record and shed_record["engine"] != "opa", shed_record  # OPA was not asked


async def test_shedding_off_lets_calls_wait(running_sidecar, sidecar_config):
    sidecar = await running_sidecar(sidecar_config(**{"sidecar.overload_lag_ms": 0}))
    async with AsyncClient(sidecar.addresses[0]) as client:
        async with saturated_loop():
            waited = await client.authorize("search_docs", {"query": "q"})
    assert waited.outcome == "allow", waited.reasons
