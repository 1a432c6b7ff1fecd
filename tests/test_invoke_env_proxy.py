"""Tool calls go straight to the URL config names, never through an environment proxy.

config.py lets an http:// upstream on loopback through without an opt-in because the call never
leaves the pod. An HTTP client honouring HTTP_PROXY / ALL_PROXY (httpx does by default) would
instead send it, arguments and credential in clear, to the proxy's host. Here every proxy variable
points at a real server that records what reaches it; the MCP upstream and the HTTP tool must get
their calls and the proxy nothing.
"""

from __future__ import annotations

import httpx2
import pytest
from aiohttp import web
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import write_policy
from tests.infra.http import PROXY_VARIABLES, recording_proxy, serve_app
from tests.infra.invoke import invoke
from tests.mcp_upstreams import Seen, docs_server, serve_http

POLICY = """\
    package sidecar

    decision := {"outcome": "allow", "reasons": ["ok: test"], "obligations": {}}
"""

@pytest.fixture
async def proxy(monkeypatch):
    """tests/infra/http.py's recording proxy, in this process's proxy variables (the sidecar runs in it)."""
    async with recording_proxy() as (env, seen):
        for name in PROXY_VARIABLES:
            monkeypatch.setenv(name, env[name])
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        yield seen


async def test_neither_kind_of_tool_call_goes_through_an_environment_proxy(tmp_path, sidecar_config, running_sidecar,
                                                                            proxy):
    docs_seen = Seen()
    docs = await serve_http(docs_server(docs_seen))
    tool_bodies: list[dict] = []

    async def tool(request: web.Request) -> web.Response:
        tool_bodies.append({"body": await request.json(), "authorization": request.headers.get("authorization", "")})
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/lookup", tool)
    secret = tmp_path / "token"
    secret.write_text("proxy-must-not-see-this-1")
    credential = {"kind": "secret_file", "file": str(secret)}
    try:
        async with serve_app(app) as base:
            config = sidecar_config(**{
                "policy.dir": str(write_policy(tmp_path / "policy", POLICY)),
                "listen.tcp": "",  # the test reaches the sidecar over its unix socket and its gateway with a client of its own
                "mcp.listen": "127.0.0.1:0",
                "mcp.upstreams": {"docs": {"url": docs.url, "credential": credential, "timeout_seconds": 5}},
                "invoke.tools": {"lookup": {"url": base + "/lookup", "credential": credential}},
            })
            sidecar = await running_sidecar(config)
            # the agent's own client ignores the proxy variables, so only the sidecar's calls are tried
            async with Client(streamable_http_client(sidecar.mcp.url, http_client=httpx2.AsyncClient(trust_env=False))) as agent:
                result = await agent.call_tool("docs__search", {"query": "rotation"})
            assert not result.is_error, result
            response = await invoke(sidecar.addresses[0], "lookup", {"q": "rotation"})
            assert response.status == "ok" and response.upstream_status == 200, response
    finally:
        await docs.stop()
    assert proxy == []
    assert [args["query"] for _, args in docs_seen.calls] == ["rotation"]
    assert docs_seen.authorization == ["Bearer proxy-must-not-see-this-1"]
    assert tool_bodies == [{"body": {"q": "rotation"}, "authorization": "Bearer proxy-must-not-see-this-1"}]
