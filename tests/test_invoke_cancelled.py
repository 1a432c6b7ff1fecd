"""A caller that goes away mid-call does not leave a tool call the sidecar made without its record.

Once the sidecar has sent an allowed call upstream, the tool may act whether or not the agent
still waits for the answer. An agent whose gRPC deadline passes (or that cancels), or an MCP
client whose request times out (it sends notifications/cancelled), cancels the sidecar's handler;
the call must still run to its end and leave its `invocation` record chained to the decision,
so the evidence shows every call the sidecar made. Found by a review: the upstream received
and answered the call, and the log held the decision only.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from mcp.client.client import Client
from mcp.server.mcpserver import MCPServer

from sidecar.evidence.verify import verify_dir
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import write_policy
from tests.infra.http import serve_app
from tests.mcp_upstreams import serve_http

POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok: slow tools"], "obligations": {}} if {
        input.tool.name in {"slow_http", "slow", "quick"}
    }
"""


def records(directory: str) -> list[dict]:
    out = []
    for path in sorted(Path(directory).glob("evidence-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


async def invocation_of(directory: str, timeout: float = 10.0) -> dict | None:
    """The first invocation record, polled for (the call finishes after its caller left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in records(directory) if r["kind"] == "invocation"]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    return None


@pytest.fixture
async def slow_http():
    state = {"received": 0, "answered": 0, "started": asyncio.Event()}

    async def slow(request: web.Request) -> web.Response:
        state["received"] += 1
        state["started"].set()
        await asyncio.sleep(1.0)
        state["answered"] += 1
        return web.json_response({"done": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    async with serve_app(app) as base:
        yield state, base


@pytest.mark.parametrize("how", ["deadline", "cancel"])
async def test_invoke_whose_caller_leaves_is_still_recorded(tmp_path, sidecar_config, running_sidecar, slow_http, how):
    state, base = slow_http
    config = sidecar_config(**{
        "policy.dir": str(write_policy(tmp_path / "policy", POLICY)),
        "listen.unix": "",
        "invoke.tools": {"slow_http": {"method": "POST", "url": base + "/work", "timeout_seconds": 10}},
    })
    sidecar = await running_sidecar(config)
    request = sidecar_pb2.InvokeRequest(call=sidecar_pb2.AuthorizeRequest(tool="slow_http"))
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        if how == "deadline":
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Invoke(request, timeout=0.3)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            pending = stub.Invoke(request)
            await asyncio.wait_for(state["started"].wait(), 10)  # the call is upstream now
            pending.cancel()
        invocation = await invocation_of(config.evidence.dir)
        assert state["received"] == 1  # the tool was called ...
        assert invocation is not None, "the call was made but has no invocation record"  # ... and it is recorded
        assert invocation["status"] == "ok" and invocation["upstream_status"] == 200
        decision = next(r for r in records(config.evidence.dir) if r["kind"] == "decision")
        assert invocation["decision_id"] == decision["decision_id"] and invocation["decision_hash"] == decision["hash"]
        # still serving
        again = await stub.Invoke(sidecar_pb2.InvokeRequest(call=sidecar_pb2.AuthorizeRequest(tool="nothing")))
        assert again.decision.outcome == sidecar_pb2.OUTCOME_DENY
    assert verify_dir(Path(config.evidence.dir)).ok


def slow_server(state: dict) -> MCPServer:
    srv = MCPServer("work")

    @srv.tool()
    async def slow(seconds: float) -> str:
        """Works for `seconds`."""
        state["received"] += 1
        await asyncio.sleep(seconds)
        state["answered"] += 1
        return "done"

    @srv.tool()
    def quick() -> str:
        """Answers at once."""
        return "quick"

    return srv


async def test_mcp_call_whose_client_times_out_is_still_recorded(gateway_config, running_sidecar):
    state = {"received": 0, "answered": 0}
    upstream = await serve_http(slow_server(state))
    try:
        config = gateway_config(POLICY, {"work": {"url": upstream.url, "timeout_seconds": 10}})
        sidecar = await running_sidecar(config)
        async with Client(sidecar.mcp.url) as agent:
            with pytest.raises(Exception):  # the client gives up and sends notifications/cancelled
                await agent.call_tool("work__slow", {"seconds": 1.0}, read_timeout_seconds=0.3)
            invocation = await invocation_of(config.evidence.dir)
            assert state["received"] == 1
            assert invocation is not None, "the call was made but has no invocation record"
            assert invocation["status"] in ("ok", "failed")  # its outcome, whichever it was
            assert not (await agent.call_tool("work__quick", {})).is_error  # still serving
    finally:
        await upstream.stop()
    assert verify_dir(Path(config.evidence.dir)).ok
