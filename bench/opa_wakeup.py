"""What waking OPA costs the sidecar's event loop, under each scheduling policy of the managed OPA.

The sidecar sends each decision's request to OPA over a unix socket and goes on
with other calls while OPA evaluates. Under Linux's default policy the kernel
may run OPA's woken thread at once on the sender's core, preempting it: the
sender then stays inside `send()` until OPA yields, and the event loop does
nothing else meanwhile. Under SCHED_BATCH (`policy.opa.batch_scheduling`, the
default) a woken OPA never preempts. `make bench` (bench/run.py) starts the
managed OPA both ways (sidecar/policy/opa/runner.py, the sidecar's own runner)
on the bench bundle and sends it real decision requests (the bench mix's
documents, built as the gate builds them) one at a time, with pauses between
them as at 100 and 1,000 calls/s, and reports how long `send()` held the
sender and the whole round trip; see docs/performance.md, "OPA's wake-ups".
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

from calls import call_mix
from sidecar.identity.dev import DevIdentityResolver
from sidecar.policy.catalog import Catalog
from sidecar.policy.input import Usage, build_input
from sidecar.policy.opa.client import DECISION_PATH
from sidecar.policy.opa.runner import OpaRunner, OpaRunOptions, find_opa
from sidecar.servicer import call_from_request
from sidecar.v1 import sidecar_pb2

GAPS_MS = (10.0, 1.0)  # the pause between requests: 100 and 1,000 calls/s


def decision_requests(bundle: Path, count: int = 50) -> list[bytes]:
    """HTTP/1.1 requests for OPA's Data API, one per call of the bench mix (the first `count`)."""
    catalog = Catalog.read(bundle)
    identity = DevIdentityResolver().resolve(None)
    requests = []
    for raw in call_mix(size=count):
        call = call_from_request(sidecar_pb2.AuthorizeRequest.FromString(raw))
        document = build_input(
            identity=identity, tool=call.tool, server=call.server, arguments=call.arguments,
            catalog_entry=catalog.entry(call.tool), task_id=call.task_id, intent=call.intent,
            signals=call.signals or {}, approval=None, usage=Usage(1, 60, 1),
            call_id=f"bench-{len(requests)}", time="2026-11-30T12:00:00Z", sidecar="bench",
        )
        body = json.dumps({"input": document}).encode()
        requests.append(
            f"POST /v1/data/{DECISION_PATH} HTTP/1.1\r\nHost: opa\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
    return requests


def _exchange(connection: socket.socket, request: bytes) -> tuple[float, float]:
    """Send one request and read its answer: (µs inside send, µs for the round trip)."""
    start = time.perf_counter()
    connection.sendall(request)
    sent = time.perf_counter()
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += connection.recv(65536)
    return (sent - start) * 1e6, (time.perf_counter() - start) * 1e6


async def _measure_one(bundle: Path, requests: list[bytes], batch: bool, count: int) -> dict[str, dict[str, float]]:
    socket_dir = Path(tempfile.mkdtemp(prefix="ow-", dir="/tmp"))
    options = OpaRunOptions(binary=find_opa(), bundle=bundle, socket=socket_dir / "opa.sock", gogc=400,
                            batch_scheduling=batch)
    figures = {}
    async with OpaRunner(options):
        with socket.socket(socket.AF_UNIX) as connection:
            connection.connect(str(options.socket))
            for request in requests:  # warm-up: every document once
                _exchange(connection, request)
            for gap_ms in GAPS_MS:
                sends, trips = [], []
                for i in range(count):
                    time.sleep(gap_ms / 1000)
                    in_send, trip = _exchange(connection, requests[i % len(requests)])
                    sends.append(in_send)
                    trips.append(trip)
                cuts = statistics.quantiles(sends, n=10)
                figures[f"every {gap_ms:g} ms"] = {
                    "send_p50_us": round(statistics.median(sends), 1), "send_p90_us": round(cuts[-1], 1),
                    "send_mean_us": round(statistics.mean(sends), 1),
                    "round_trip_p50_us": round(statistics.median(trips), 1),
                }
    shutil.rmtree(socket_dir, ignore_errors=True)
    return figures


def measure(bundle: Path, count: int) -> dict[str, dict]:
    """`count` requests per policy and gap: {"normal" | "batch": {"every N ms": {send_p50_us, send_p90_us,
    send_mean_us, round_trip_p50_us}}}."""
    requests = decision_requests(bundle)
    return {name: asyncio.run(_measure_one(bundle, requests, batch, count))
            for name, batch in (("normal", False), ("batch", True))}


def print_table(figures: dict[str, dict]) -> None:
    print("\nWaking the managed OPA, one decision request at a time (bench/opa_wakeup.py)")
    print(f"{'OPA scheduling':<16}{'pause':<14}{'in send() p50 us':>18}{'p90 us':>10}{'mean us':>10}{'round trip p50 us':>19}")
    for name, by_gap in figures.items():
        for gap, row in by_gap.items():
            print(f"{name:<16}{gap:<14}{row['send_p50_us']:>18.1f}{row['send_p90_us']:>10.1f}{row['send_mean_us']:>10.1f}"
                  f"{row['round_trip_p50_us']:>19.1f}")


if __name__ == "__main__":
    raise SystemExit("run by bench/run.py (make bench)")
