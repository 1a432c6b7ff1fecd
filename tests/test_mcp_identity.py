"""The gateway's caller is resolved by the same identity resolvers as Authorize: a JWT-SVID in
`authorization: Bearer`, delegation in `x-spiffe-delegation`; an unverifiable caller sees no
tools and every call is denied and recorded. Workload API: tests/doubles/fake_workload_api.py."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import httpx2
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from sidecar.config import load_config
from sidecar.escalation.client import ApprovalsClient
from sidecar.identity.delegation import link_audience
from tests.conftest import LOADED_MACHINE, write_policy
from tests.doubles.identity_harness import fake_agent, remove_dir, short_dir
from tests.mcp_upstreams import Seen, docs_server, serve_http
from tests.test_mcp_gateway import POLICY


async def until_identity(sidecar, timeout: float = 60.0) -> None:
    """Until the sidecar's identity is healthy (SVID and bundles from the Workload API), or fail:
    a deadline for a loaded machine, not 100 polls after which the test went on regardless."""
    deadline = time.monotonic() + timeout
    while not sidecar.identity.health()[0]:
        assert time.monotonic() < deadline, sidecar.identity.health()
        await asyncio.sleep(0.05)

SIDECAR_ID = "spiffe://example.org/ns/agents/sa/sidecar"
PLANNER = "spiffe://example.org/ns/agents/sa/planner"
ORCHESTRATOR = "spiffe://example.org/ns/agents/sa/orchestrator"
AUD = SIDECAR_ID
DELEGATION_AUD = "spiffe://example.org/delegation"


def gateway_settings(tmp_path: Path, agent, upstream_url: str) -> dict:
    """A sidecar whose callers present JWT-SVIDs, with the MCP gateway in front of the `docs` upstream."""
    return {
        **LOADED_MACHINE,  # room for a loaded machine: identity is under test, not policy speed
        "listen.tcp": "127.0.0.1:0",
        "policy.dir": str(write_policy(tmp_path / "policy", POLICY)),
        "policy.reload": False,
        "evidence.dir": str(tmp_path / "evidence"),
        "telemetry.exporter": "none",
        "identity.sources": ["jwt_svid"],
        "identity.workload_api_socket": agent.endpoint,
        "identity.jwt_audience": AUD,
        "identity.delegation_audience": DELEGATION_AUD,
        "escalation.approvers": ["email:*@example.org"],
        "mcp.listen": "127.0.0.1:0",
        "mcp.upstreams": {"docs": {"url": upstream_url}},
    }


@pytest.fixture
async def world(tmp_path, running_sidecar):
    sockdir = short_dir()
    agent = fake_agent(sockdir, path="/ns/agents/sa/sidecar")
    seen = Seen()
    upstream = await serve_http(docs_server(seen))
    sidecar = await running_sidecar(load_config(None, gateway_settings(tmp_path, agent, upstream.url)))
    await until_identity(sidecar)  # the JWT bundle arrives from the Workload API in the background
    yield agent, sidecar, seen, tmp_path / "evidence"
    await upstream.stop()
    agent.stop()
    remove_dir(sockdir)


def agent_client(url: str, headers: dict[str, str]) -> Client:
    return Client(streamable_http_client(url, http_client=httpx2.AsyncClient(headers=headers)))


def decisions(directory: Path) -> list[dict]:
    lines = (directory / "evidence-000001.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "decision"]


async def test_a_jwt_svid_caller_is_the_subject_and_delegation_rides_along(world):
    agent, sidecar, seen, evidence = world
    token = agent.jwt_authority.mint(PLANNER, AUD)
    chain = agent.jwt_authority.mint(ORCHESTRATOR, link_audience(DELEGATION_AUD, to=PLANNER))
    async with agent_client(sidecar.mcp.url, {"authorization": f"Bearer {token}",
                                              "x-spiffe-delegation": chain}) as client:
        assert "docs__search" in {t.name for t in (await client.list_tools()).tools}
        assert not (await client.call_tool("docs__whoami", {})).is_error
    record = decisions(evidence)[-1]
    assert record["subject"]["spiffe_id"] == PLANNER and record["subject"]["source"] == "jwt_svid"
    assert [d["spiffe_id"] for d in record["delegation"]] == [ORCHESTRATOR]
    assert seen.authorization == [""]  # the agent's token is not passed upstream


@pytest.mark.parametrize("headers, why", [
    ({}, "unverified_caller"),
    ({"authorization": "Bearer not-a-jwt"}, "unverified_caller"),
    ("wrong-audience", "unverified_caller"),
    ("expired", "unverified_caller"),
])
async def test_unverified_callers_see_nothing_and_are_denied_and_recorded(world, headers, why):
    agent, sidecar, seen, evidence = world
    if headers == "wrong-audience":
        headers = {"authorization": f"Bearer {agent.jwt_authority.mint(PLANNER, 'elsewhere')}"}
    elif headers == "expired":
        headers = {"authorization": f"Bearer {agent.jwt_authority.mint(PLANNER, AUD, ttl=-5)}"}
    async with agent_client(sidecar.mcp.url, headers) as client:
        with pytest.raises(MCPError) as info:
            await client.list_tools()
        assert why in str(info.value)
        result = await client.call_tool("docs__whoami", {})
    assert result.is_error and why in result.content[0].text
    assert not seen.calls
    record = decisions(evidence)[-1]
    assert record["outcome"] == "deny" and record["subject"] is None and record["reasons"][0].startswith(why)


async def test_callers_on_the_unix_socket_get_the_pod_identity_and_tcp_callers_do_not(tmp_path, running_sidecar):
    sockdir = short_dir()
    agent = fake_agent(sockdir, path="/ns/agents/sa/sidecar")
    seen = Seen()
    upstream = await serve_http(docs_server(seen))
    try:
        config = load_config(None, {
            **LOADED_MACHINE,  # room for a loaded machine: identity is under test, not policy speed
            "listen.tcp": "", "listen.unix": f"{sockdir}/grpc.sock",
            "policy.dir": str(write_policy(tmp_path / "policy", POLICY)), "policy.reload": False,
            "evidence.dir": str(tmp_path / "evidence"), "telemetry.exporter": "none",
            "identity.sources": ["workload_api"], "identity.workload_api_socket": agent.endpoint,
            "escalation.approvers": ["email:*@example.org"],
            "mcp.listen": "127.0.0.1:0", "mcp.unix": f"{sockdir}/mcp.sock",
            "mcp.upstreams": {"docs": {"url": upstream.url}},
        })
        sidecar = await running_sidecar(config)
        await until_identity(sidecar)
        http = httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=f"{sockdir}/mcp.sock"))
        async with Client(streamable_http_client("http://localhost/mcp", http_client=http)) as in_pod:
            assert not (await in_pod.call_tool("docs__whoami", {})).is_error
        async with Client(sidecar.mcp.url) as over_tcp:
            refused = await over_tcp.call_tool("docs__whoami", {})
        assert refused.is_error and "unverified_caller" in refused.content[0].text
        records = decisions(tmp_path / "evidence")
        assert records[-2]["subject"]["spiffe_id"] == SIDECAR_ID
        assert records[-2]["subject"]["source"] == "workload_api"
        assert records[-1]["subject"] is None and len(seen.calls) == 1
    finally:
        await upstream.stop()
        agent.stop()
        remove_dir(sockdir)


async def test_two_authorization_headers_are_refused_not_one_picked(world):
    agent, sidecar, seen, evidence = world
    good = agent.jwt_authority.mint(PLANNER, AUD)
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
            "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "docs__whoami", "arguments": {}, "_meta": meta}}
    async with httpx2.AsyncClient() as http:
        response = await http.post(sidecar.mcp.url, json=body, headers=[
            ("accept", "application/json, text/event-stream"), ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"), ("mcp-name", "docs__whoami"),
            ("authorization", f"Bearer {good}"), ("authorization", "Bearer forged"),
        ])
    assert "unverified_caller" in response.text, response.text
    assert not seen.calls
    record = decisions(evidence)[-1]
    assert record["outcome"] == "deny" and record["subject"] is None


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_call_approved_while_the_gateway_waits_is_decided_on_the_caller_as_it_is_then(
        tmp_path, running_sidecar, mode):
    """With elicitation the gateway waits for the approver inside the agent's tools/call, then decides the
    call again as its approved repeat. It did so on the identity it had resolved before the wait: a JWT-SVID
    that expired meanwhile still ran the call. Now the caller is verified again from the request before
    the repeat is decided: an expired token is denied unverified_caller, recorded, and the upstream is not
    called; the approval stays unused."""
    from tests.test_mcp_elicitation import User, until_waiting

    sockdir = short_dir()
    agent = fake_agent(sockdir, path="/ns/agents/sa/sidecar")
    seen = Seen()
    upstream = await serve_http(docs_server(seen))
    approver = "spiffe://example.org/humans/alice"
    try:
        sidecar = await running_sidecar(load_config(None, {
            **gateway_settings(tmp_path, agent, upstream.url),
            "escalation.approvers": [approver], "mcp.elicitation_wait_seconds": 60,
        }))
        await until_identity(sidecar)
        short = agent.jwt_authority.mint(PLANNER, AUD, ttl=4)
        expires_at = json.loads(base64.urlsafe_b64decode(short.split(".")[1] + "=="))["exp"]
        user = User()
        http = httpx2.AsyncClient(headers={"authorization": f"Bearer {short}"})
        async with Client(streamable_http_client(sidecar.mcp.url, http_client=http), elicitation_callback=user,
                          mode=mode) as client, \
                ApprovalsClient(sidecar.addresses[0],
                                metadata=lambda: [("authorization",
                                                   f"Bearer {agent.jwt_authority.mint(approver, AUD)}")]) as approvals:
            call = asyncio.create_task(client.call_tool("docs__send", {"to": ["cfo@example.com"], "body": "Q3"}))
            escalation_id = await until_waiting(approvals, user)
            await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.5)
            await approvals.approve(escalation_id, note="fine")
            try:
                result = await call
                answer = result.content[0].text if result.is_error else f"the call ran: {result}"
            except MCPError as exc:  # the SDK client lists tools after a result (to check its output schema),
                answer = str(exc)    # refused as unverified too: what ran is told by the approval and the upstream
            assert "unverified_caller: jwt_svid: the token expired at" in answer, answer
            assert (await approvals.get(escalation_id))["state"] == "approved"  # not used
        assert not seen.calls
        repeat = [r for r in decisions(tmp_path / "evidence") if r.get("escalation_id") == escalation_id][-1]
        assert repeat["outcome"] == "deny" and repeat["subject"] is None, repeat
        assert repeat["reasons"][0].startswith("unverified_caller: jwt_svid: the token expired at")
    finally:
        await upstream.stop()
        agent.stop()
        remove_dir(sockdir)
