"""Upstreams that misbehave: a stdio server that dies mid-call (restarted), an HTTP "MCP server"
that answers garbage, many calls at once. Each gets a clear error result, recorded; the gateway
keeps serving."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web
from mcp.client.client import Client

from sidecar.evidence.verify import verify_dir
from sidecar.invoke import FAILED, OK
from sidecar.invoke.mcp import McpUpstream
from tests.conftest import write_policy
from tests.infra.http import serve_app
from tests.mcp_upstreams import STDIO_SERVER, Seen, docs_server, serve_http
from tests.test_mcp_gateway import POLICY

FAULT_POLICY = POLICY + """
    decision := {"outcome": "allow", "reasons": ["ok: crash"], "obligations": {}} if {
        input.tool.name == "crash"
    }
"""


@pytest.fixture
async def garbage_upstream():
    """Answers every POST with 200 and a body that is not JSON-RPC (nothing the SDK can produce)."""

    async def garbage(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="<html>surprise</html>", content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/mcp", garbage)
    async with serve_app(app) as base:
        yield base + "/mcp"


@pytest.fixture
async def gateway(tmp_path, sidecar_config, running_sidecar, garbage_upstream):
    seen = Seen()
    docs = await serve_http(docs_server(seen))
    config = sidecar_config(**{
        "policy.dir": str(write_policy(tmp_path / "policy", FAULT_POLICY)),
        "listen.unix": "",
        "mcp.listen": "127.0.0.1:0",
        "mcp.upstreams": {
            "docs": {"url": docs.url, "timeout_seconds": 5},
            "notes": {"command": [sys.executable, STDIO_SERVER], "timeout_seconds": 5},
            "junk": {"url": garbage_upstream, "timeout_seconds": 1},
        },
    })
    yield await running_sidecar(config), seen, config
    await docs.stop()


async def until_listed(agent: Client, name: str, timeout: float = 60) -> None:
    """Until the gateway lists `name`: a stdio upstream's process is started with the sidecar and on
    a loaded machine takes longer than its timeout_seconds to answer the handshake, and a call that
    waited that long for it fails (upstream_unavailable). Each listing asks the upstreams afresh."""
    deadline = time.monotonic() + timeout
    while name not in {t.name for t in (await agent.list_tools()).tools}:
        assert time.monotonic() < deadline, f"{name} not listed after {timeout:g} s"
        await asyncio.sleep(0.2)


async def test_a_stdio_upstream_that_dies_is_an_error_then_restarted(gateway):
    sidecar, _, config = gateway
    async with Client(sidecar.mcp.url) as agent:
        await until_listed(agent, "notes__search")
        first = await agent.call_tool("notes__search", {"query": "a"})
        assert not first.is_error, first
        died = await agent.call_tool("notes__crash", {})
        assert died.is_error and "upstream_" in died.content[0].text, died
        deadline = time.monotonic() + 60  # the session is reconnected (the process restarted) in the background
        while (again := await agent.call_tool("notes__search", {"query": "b"})).is_error and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not again.is_error, again
    assert verify_dir(Path(config.evidence.dir)).ok


async def test_calls_made_as_a_stdio_upstream_dies_wait_for_its_one_restart():
    """Once a call finds the process gone, the calls after it wait for the restarted process: none is
    handed the dead session while it is torn down (seconds, on a loaded machine), and none that fails
    on it ends the new session, which would restart the process again and again while calls come."""
    upstream = McpUpstream("notes", command=[sys.executable, STDIO_SERVER], timeout_seconds=60)
    upstream.start()
    try:
        first = await upstream.call("pid", {})
        assert first.status == OK, first
        died = await upstream.call("crash", {})
        assert died.status == FAILED and "upstream_unavailable" in died.error, died
        after = await asyncio.gather(*(upstream.call("pid", {}) for _ in range(8)))
        assert all(r.status == OK for r in after), [r.error for r in after if r.status != OK]
        (restarted,) = {r.result["content"][0]["text"] for r in after}
        assert restarted != first.result["content"][0]["text"]
        later = await upstream.call("pid", {})
        assert later.status == OK and later.result["content"][0]["text"] == restarted, later
    finally:
        await upstream.aclose()


async def test_an_upstream_answering_garbage_is_an_error_and_others_keep_serving(gateway):
    sidecar, _, config = gateway
    async with Client(sidecar.mcp.url) as agent:
        names = {t.name for t in (await agent.list_tools()).tools}
        assert "docs__search" in names and not any(n.startswith("junk__") for n in names)
        result = await agent.call_tool("junk__whoami", {})
        assert result.is_error and "upstream_unavailable" in result.content[0].text
        assert not (await agent.call_tool("docs__whoami", {})).is_error
    log = [json.loads(line) for line in (Path(config.evidence.dir) / "evidence-000001.jsonl").read_text().splitlines()]
    # its tools' input schemas cannot be read, so the call is denied before policy (sidecar/invoke/schemas.py)
    refused = [r for r in log if r["kind"] == "decision" and r["server"] == "junk"]
    assert [r["outcome"] for r in refused] == ["deny"] and refused[0]["reasons"][0].startswith("upstream_unavailable:")


async def test_many_calls_at_once_each_get_their_own_answer_and_record(gateway):
    sidecar, seen, config = gateway
    async with Client(sidecar.mcp.url) as agent:
        results = await asyncio.gather(*(
            agent.call_tool("docs__search", {"query": f"q{i}", "limit": 2}) for i in range(20)
        ))
    assert all(not r.is_error for r in results)
    assert sorted(json.loads(r.content[0].text)["received"]["query"] for r in results) == sorted(f"q{i}" for i in range(20))
    log = [json.loads(line) for line in (Path(config.evidence.dir) / "evidence-000001.jsonl").read_text().splitlines()]
    invocations = [r for r in log if r["kind"] == "invocation"]
    decisions = {r["decision_id"] for r in log if r["kind"] == "decision"}
    assert len(invocations) == 20 and {r["decision_id"] for r in invocations} <= decisions
    assert verify_dir(Path(config.evidence.dir)).ok


async def test_an_upstream_behind_an_untrusted_certificate_is_unavailable(tmp_path, sidecar_config, running_sidecar):
    import socket

    import uvicorn
    from cryptography.hazmat.primitives import serialization

    from tests.doubles.pki import TestCa

    svid = TestCa("example.org").issue("/docs")
    (tmp_path / "cert.pem").write_bytes(svid.chain_pem())
    (tmp_path / "key.pem").write_bytes(svid.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    seen = Seen()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(docs_server(seen).streamable_http_app(), log_level="warning",
                                          ssl_certfile=str(tmp_path / "cert.pem"), ssl_keyfile=str(tmp_path / "key.pem")))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        sidecar = await running_sidecar(sidecar_config(**{
            "policy.dir": str(write_policy(tmp_path / "policy", POLICY)), "listen.unix": "",
            "mcp.listen": "127.0.0.1:0",
            "mcp.upstreams": {"docs": {"url": f"https://127.0.0.1:{sock.getsockname()[1]}/mcp", "timeout_seconds": 2}},
        }))
        async with Client(sidecar.mcp.url) as agent:
            result = await agent.call_tool("docs__whoami", {})
        assert result.is_error and "upstream_unavailable" in result.content[0].text, result
        assert not seen.calls
    finally:
        server.should_exit = True
        await task
