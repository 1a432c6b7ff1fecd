"""What one large call costs the sidecar: its CPU per call for arguments of several shapes.

An agent may send up to `policy.max_input_bytes` (1 MiB) of arguments, and
everything the sidecar does with them (the checks, the digest, policy input,
redaction, the evidence record) runs on its one event loop: the CPU one call
takes is time every other call waits. `make bench` (bench/run.py) sends each
shape below a few times to a running sidecar over gRPC and reports the
sidecar's and its OPA's CPU per call (from /proc) and the latency; see
docs/performance.md, "Large calls".

Each shape is about 600 KB as canonical JSON, so that its protobuf Struct
stays under gRPC's 4 MB default message limit (a number in a Struct takes
about 12 bytes).
"""

from __future__ import annotations

import time
from typing import Any, Callable

SIZE = 600_000  # bytes of canonical JSON per shape, about

WORDS = "quarterly revenue report churn forecast incident latency budget roadmap hiring ".split()

SHAPES: dict[str, Callable[[], Any]] = {
    "prose": lambda: " ".join(WORDS[i % len(WORDS)] for i in range(SIZE // 8)),
    "one long token": lambda: "token " + "a" * SIZE,
    "integers": lambda: [7] * (SIZE // 2),
    "decimals": lambda: [0.25] * (SIZE // 5),
    "tiny floats (1e-7)": lambda: [1e-7] * (SIZE // 5),
    "integral floats (3.0)": lambda: [3.0] * (SIZE // 2),
    "nested objects": lambda: [[{"b": [1, "x"]}] for _ in range(SIZE // 20)],
    "many keys": lambda: {f"k{i}": i for i in range(SIZE // 14)},
}


async def measure(target: str, cpu: Callable[[], dict[str, float]], *, repeats: int = 3) -> dict[str, dict]:
    """Send each shape `repeats` times (after one warm-up call) to the sidecar at `target`.

    `cpu()` gives the CPU seconds used so far by the sidecar and its OPA ({"sidecar", "opa"}).
    Returns, per shape: canonical JSON bytes, the mean CPU ms per call of each, the mean
    latency in ms, and the outcomes with their first reason's code.
    """
    import grpc

    from sidecar.canonical import canonical_json
    from sidecar.client import build_request
    from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

    figures: dict[str, dict] = {}
    options = [("grpc.max_send_message_length", 8 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        for name, make in SHAPES.items():
            arguments = {"query": "large call", "data": make()}
            request = build_request("search_docs", arguments, task_id="large-calls")
            await stub.Authorize(request, timeout=60)  # warm-up
            before, started = cpu(), time.perf_counter()
            answers = [await stub.Authorize(request, timeout=60) for _ in range(repeats)]
            elapsed, after = time.perf_counter() - started, cpu()
            figures[name] = {
                "bytes": len(canonical_json(arguments)),
                "cpu_ms_per_call": {k: round((after[k] - before[k]) * 1000 / repeats, 1) for k in after},
                "latency_ms": round(elapsed * 1000 / repeats, 1),
                "outcomes": sorted({
                    f"{sidecar_pb2.Outcome.Name(a.outcome).removeprefix('OUTCOME_').lower()} "
                    f"{a.reasons[0].split(':', 1)[0] if a.reasons else ''}".strip()
                    for a in answers
                }),
            }
    return figures


def print_table(figures: dict[str, dict]) -> None:
    print("\nLarge calls, one at a time (bench/large_calls.py)")
    print(f"{'arguments':<24}{'KB':>6}{'sidecar CPU ms':>16}{'OPA CPU ms':>12}{'latency ms':>12}  outcome")
    for name, row in figures.items():
        cpu = row["cpu_ms_per_call"]
        print(f"{name:<24}{row['bytes'] / 1000:>6.0f}{cpu['sidecar']:>16.1f}{cpu['opa']:>12.1f}"
              f"{row['latency_ms']:>12.1f}  {', '.join(row['outcomes'])}")


if __name__ == "__main__":
    raise SystemExit("run by bench/run.py (make bench), which starts the sidecar it measures")
