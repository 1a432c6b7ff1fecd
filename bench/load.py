"""The load generator: async gRPC clients in their own process, printing JSON results.

    python bench/load.py TARGET open --rate 1000 --seconds 5
    python bench/load.py TARGET closed --concurrency 64 --seconds 5

Open loop starts calls on a fixed schedule whatever the answers' latency (so
queueing shows in the percentiles); closed loop keeps `concurrency` calls in
flight to find saturation. Calls are a mix of allowed, denied and escalated
tool calls with realistic arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import grpc

from sidecar.client import build_request
from sidecar.v1 import sidecar_pb2

OUTCOMES = {sidecar_pb2.OUTCOME_ALLOW: "allow", sidecar_pb2.OUTCOME_DENY: "deny", sidecar_pb2.OUTCOME_ESCALATE: "escalate"}


def call_mix(seed: int = 7, size: int = 2000) -> list[bytes]:
    """~70% allowed, ~20% denied, ~10% escalated, serialized once up front."""
    rng = random.Random(seed)
    words = "quarterly revenue report churn forecast incident latency budget roadmap hiring".split()
    calls = []
    for i in range(size):
        roll = rng.random()
        task = f"task-{rng.randrange(50)}"
        if roll < 0.35:
            request = build_request("search_docs", {"query": " ".join(rng.sample(words, 4)), "limit": 10}, task_id=task,
                                    intent="find background for the weekly report", signals={"risk_score": 0.1, "model": "bench-model"})
        elif roll < 0.70:
            request = build_request("read_file", {"path": f"/workspace/reports/{rng.choice(words)}-{i}.md", "encoding": "utf-8"},
                                    task_id=task, signals={"risk_score": 0.2})
        elif roll < 0.80:
            request = build_request("read_file", {"path": f"/etc/{rng.choice(words)}"}, task_id=task)
        elif roll < 0.90:
            request = build_request("no_such_tool", {"x": i}, task_id=task)
        else:
            body = " ".join(rng.choice(words) for _ in range(200))
            request = build_request("send_email", {"to": [f"user{i}@example.org"], "subject": "Weekly report", "body": body},
                                    task_id=task, signals={"risk_score": 0.5})
        calls.append(request.SerializeToString())
    return calls


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    if not latencies_ms:
        return {}
    ordered = sorted(latencies_ms)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": ordered[-1]}


def open_channel(target: str, tls_dir: str | None) -> grpc.aio.Channel:
    """Plaintext, or mTLS with the client SVID files (svid.pem, key.pem, bundle.pem) in tls_dir."""
    if tls_dir is None:
        return grpc.aio.insecure_channel(target)
    files = {name: open(f"{tls_dir}/{name}", "rb").read() for name in ("svid.pem", "key.pem", "bundle.pem")}
    credentials = grpc.ssl_channel_credentials(files["bundle.pem"], files["key.pem"], files["svid.pem"])
    return grpc.aio.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", "sidecar.local")])


async def run(target: str, mode: str, rate: float, concurrency: int, seconds: float, channels: int,
              tls_dir: str | None = None) -> dict:
    pool = [open_channel(target, tls_dir) for _ in range(channels)]
    methods = [
        channel.unary_unary("/sidecar.v1.ToolGate/Authorize", request_serializer=lambda b: b,
                            response_deserializer=sidecar_pb2.AuthorizeResponse.FromString)
        for channel in pool
    ]
    calls = call_mix()
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    # Denies that stand in for a decision the sidecar could not make, by reason code.
    fail_closed: dict[str, int] = {}
    errors = 0

    async def one(index: int) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            response = await methods[index % len(methods)](calls[index % len(calls)], timeout=10)
        except grpc.aio.AioRpcError:
            errors += 1
            return
        latencies.append((time.perf_counter() - started) * 1000)
        outcome = OUTCOMES.get(response.outcome, "unspecified")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        for reason in response.reasons[:1]:
            code = reason.split(":", 1)[0]
            if code.startswith("policy_") or code in ("overloaded", "evidence_unavailable"):
                fail_closed[code] = fail_closed.get(code, 0) + 1

    # Warm up connections and the server's first-call paths.
    await asyncio.gather(*(one(i) for i in range(50)))
    latencies.clear()
    outcomes.clear()
    fail_closed.clear()
    print("warmed", flush=True)  # bench/run.py starts its measurement window here

    began = time.perf_counter()
    cpu_began = time.process_time()  # this process's CPU (all threads): what driving the load costs
    if mode == "open":
        total = int(rate * seconds)
        tasks = []
        for i in range(total):
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
    else:
        counter = iter(range(10**9))
        deadline = began + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await one(next(counter))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu_seconds = time.process_time() - cpu_began
    for channel in pool:
        await channel.close()
    return {
        "mode": mode,
        "target_rate": rate if mode == "open" else None,
        "concurrency": concurrency if mode == "closed" else None,
        "calls": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "throughput": len(latencies) / elapsed,
        "cpu_seconds": cpu_seconds,
        "latency_ms": percentiles(latencies),
        "outcomes": outcomes,
        "fail_closed": fail_closed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target")
    parser.add_argument("mode", choices=["open", "closed"])
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--tls-dir", help="directory with svid.pem, key.pem, bundle.pem for mTLS")
    args = parser.parse_args()
    result = asyncio.run(run(args.target, args.mode, args.rate, args.concurrency, args.seconds, args.channels,
                             args.tls_dir))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
