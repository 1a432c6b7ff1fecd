"""What the MCP gateway adds to a tool call: the same MCP client calling an SDK-built MCP server
directly, then through the sidecar's gateway (policy, evidence, invocation record), sequentially.

    .venv/bin/python bench/mcp_gateway.py [--calls 300] [--out FILE]

The sidecar (managed OPA, durable evidence, dev identity) and the MCP
server run in this process's event loop on loopback, like a sidecar beside
its agent; the figures are per call, client-observed. `make bench`
(bench/run.py) runs it after the gRPC scenarios and reports its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

POLICY = """\
package sidecar

default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

decision := {"outcome": "allow", "reasons": ["ok: bench"], "obligations": {}} if input.tool.name == "echo"
"""


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": round(pick(0.5), 3), "p99_ms": round(pick(0.99), 3), "mean_ms": round(statistics.mean(ordered), 3)}


async def timed_calls(url: str, calls: int, name: str) -> list[float]:
    from mcp.client.client import Client

    samples = []
    async with Client(url) as client:
        for i in range(20):  # warm-up: connections, caches, the managed OPA
            await client.call_tool(name, {"text": f"warm {i}"})
        for i in range(calls):
            started = time.perf_counter()
            result = await client.call_tool(name, {"text": f"call {i}"})
            samples.append((time.perf_counter() - started) * 1000)
            if result.is_error:
                raise RuntimeError(f"{name}: {result.content}")
    return samples


async def main(calls: int) -> dict:
    import socket

    import uvicorn
    from mcp.server.mcpserver import MCPServer

    from sidecar.config import load_config
    from sidecar.server import start_sidecar

    server = MCPServer("bench")

    @server.tool()
    def echo(text: str) -> str:
        return text

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    upstream = uvicorn.Server(uvicorn.Config(server.streamable_http_app(), log_level="warning"))
    task = asyncio.create_task(upstream.serve(sockets=[sock]))
    while not upstream.started:
        await asyncio.sleep(0.01)
    direct_url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "policy").mkdir()
        (Path(tmp) / "policy" / "policy.rego").write_text(POLICY)
        config = load_config(None, {
            "listen.tcp": "127.0.0.1:0", "policy.dir": f"{tmp}/policy", "policy.reload": False,
            "evidence.dir": f"{tmp}/evidence", "telemetry.exporter": "none",
            "identity.sources": ["dev"],  # dev mode on purpose: the default is workload_api
            "mcp.listen": "127.0.0.1:0", "mcp.upstreams": {"bench": {"url": direct_url}},
        })
        sidecar = await start_sidecar(config)
        try:
            direct = await timed_calls(direct_url, calls, "echo")
            gateway = await timed_calls(sidecar.mcp.url, calls, "bench__echo")
        finally:
            await sidecar.stop(grace=0)
    upstream.should_exit = True
    await task
    d, g = percentiles(direct), percentiles(gateway)
    return {
        "calls": calls,
        "direct": d,
        "through_gateway": g,
        "overhead": {k: round(g[k] - d[k], 3) for k in d},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", metavar="FILE")
    args = parser.parse_args()
    figures = asyncio.run(main(args.calls))
    print(f"{'':18}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for label in ("direct", "through_gateway", "overhead"):
        row = figures[label]
        print(f"{label:18}{row['p50_ms']:>10}{row['p99_ms']:>10}{row['mean_ms']:>10}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
