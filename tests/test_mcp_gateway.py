"""The MCP gateway, end to end: a real MCP client from the SDK → the sidecar's gateway → real
MCP servers built with the SDK (one over Streamable HTTP, one over stdio), with real policy,
escalations and the evidence log."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx2
import pytest
from mcp.client.client import Client

from sidecar.escalation.client import ApprovalsClient
from sidecar.evidence.verify import verify_dir
from tests.mcp_upstreams import STDIO_SERVER, Seen, docs_server, serve_http

SECRET = "upstream-secret-7f3a"
ALICE = "email:alice@example.org"

POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "deny", "reasons": ["forbidden: never"], "obligations": {}} if {
        input.tool.name == "forbidden"
    }

    decision := {"outcome": "allow", "reasons": ["ok: search"], "obligations": {
        "clamp_arguments": {"limit": 5}, "drop_arguments": ["debug"],
        "redact_call_arguments": ["note"], "cap_list_arguments": {"tags": 2},
    }} if {
        input.tool.name == "search"
        input.tool.server == "docs"
    }

    decision := {"outcome": "allow", "reasons": ["ok: notes"], "obligations": {}} if {
        input.tool.name == "search"
        input.tool.server == "notes"
    }

    decision := {"outcome": "allow", "reasons": ["ok: plain"], "obligations": {}} if {
        input.tool.name in {"whoami", "slow", "big", "fail", "docs__search"}
    }

    decision := {"outcome": "allow", "reasons": ["ok: weird"], "obligations": {"frobnicate": true}} if {
        input.tool.name == "weird"
    }

    decision := {"outcome": "escalate", "reasons": ["needs_approval: sending is reviewed"], "obligations": {}} if {
        input.tool.name == "send"
        input.approval == null
    }

    decision := {"outcome": "allow", "reasons": ["approved: by a human"], "obligations": {}} if {
        input.tool.name == "send"
        input.approval != null
    }
"""


def evidence(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("evidence-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


@pytest.fixture
async def docs_upstream():
    seen = Seen()
    upstream = await serve_http(docs_server(seen))
    yield upstream, seen
    await upstream.stop()


@pytest.fixture
async def gateway(tmp_path, gateway_config, running_sidecar, docs_upstream):
    upstream, seen = docs_upstream
    secret = tmp_path / "docs-token"
    secret.write_text(SECRET + "\n")
    config = gateway_config(POLICY, {
        "docs": {"url": upstream.url, "timeout_seconds": 4, "max_result_bytes": 20_000,
                 "credential": {"kind": "secret_file", "file": str(secret)}},
        "notes": {"command": [sys.executable, STDIO_SERVER]},
    })
    sidecar = await running_sidecar(config)
    return sidecar, seen, config


async def test_list_shows_only_what_policy_would_not_deny_with_unambiguous_names(gateway):
    sidecar, _, _ = gateway
    async with Client(sidecar.mcp.url) as agent:
        tools = {t.name: t for t in (await agent.list_tools()).tools}
    assert "docs__search" in tools and "notes__search" in tools  # one tool name, two upstreams
    assert "docs__forbidden" not in tools  # policy denies it: hidden
    assert "docs__send" in tools  # escalates: still offered
    assert "notes__docs__search" not in tools  # a tool named like another upstream's: refused
    assert tools["docs__search"].description == "Search the docs."
    assert tools["docs__search"].input_schema["properties"]["limit"]["type"] == "integer"


async def test_allow_forwards_with_obligations_and_credential_the_agent_never_sees(gateway):
    sidecar, seen, config = gateway
    async with Client(sidecar.mcp.url) as agent:
        result = await agent.call_tool(
            "docs__search",
            {"query": "rotation", "limit": 50, "tags": ["a", "b", "c"], "debug": True, "note": "my card 4111"},
            meta={"sidecar/task_id": "task-1"},
        )
    assert not result.is_error, result
    # what the tool received: clamped, capped, dropped, redacted
    assert seen.calls[-1] == ("search", {"query": "rotation", "limit": 5, "tags": ["a", "b"], "debug": False,
                                         "note": "[REDACTED]"})
    assert seen.authorization[-1] == f"Bearer {SECRET}"  # attached by the sidecar
    assert SECRET not in result.model_dump_json()
    assert result.meta["sidecar/outcome"] == "allow"
    records = evidence(Path(config.evidence.dir))
    decision = next(r for r in records if r["kind"] == "decision" and r["tool"] == "search")
    invocation = next(r for r in records if r["kind"] == "invocation")
    assert decision["server"] == "docs" and decision["task_id"] == "task-1"
    assert invocation["decision_id"] == decision["decision_id"]
    assert invocation["decision_hash"] == decision["hash"]
    assert invocation["parent_span_id"] == decision["span_id"] and invocation["trace_id"] == decision["trace_id"]
    assert invocation["status"] == "ok" and invocation["autonomy"] == "autonomous"
    assert invocation["credential_kind"] == "secret_file"
    assert SECRET not in json.dumps(records)
    assert {c["action"] for c in invocation["arguments_changed"]} == {"clamped", "capped", "dropped", "redacted"}
    assert invocation["result_digest"].startswith("sha256:")
    assert verify_dir(Path(config.evidence.dir)).ok


async def test_stdio_upstream_and_same_tool_name_routes_by_prefix(gateway):
    sidecar, seen, _ = gateway
    async with Client(sidecar.mcp.url) as agent:
        result = await agent.call_tool("notes__search", {"query": "x"})
    assert not result.is_error, result
    assert "note about x" in result.content[0].text
    assert not seen.calls  # the docs upstream was not called


async def test_deny_is_a_tool_error_with_reasons_and_nothing_is_called(gateway):
    sidecar, seen, config = gateway
    async with Client(sidecar.mcp.url) as agent:
        result = await agent.call_tool("docs__forbidden", {})
    assert result.is_error
    assert "forbidden: never" in result.content[0].text
    assert not seen.calls
    kinds = [r["kind"] for r in evidence(Path(config.evidence.dir))]
    assert "invocation" not in kinds


async def test_escalate_approve_then_the_same_call_runs_once(gateway):
    sidecar, seen, config = gateway
    call = {"to": ["cfo@example.com"], "body": "Q3"}
    async with Client(sidecar.mcp.url) as agent, ApprovalsClient(sidecar.addresses[0]) as approvals:
        first = await agent.call_tool("docs__send", call)
        assert first.is_error
        escalation_id = first.meta["sidecar/escalation_id"]
        assert escalation_id in first.content[0].text and "AwaitDecision" in first.content[0].text
        pending = await agent.call_tool("docs__send", call)
        assert pending.is_error and pending.meta["sidecar/escalation_id"] == escalation_id  # the same escalation
        assert not seen.calls
        await approvals.approve(escalation_id, note="fine", approver=ALICE)
        approved = await agent.call_tool("docs__send", call)
        assert not approved.is_error, approved
        assert seen.calls == [("send", call)]
        again = await agent.call_tool("docs__send", call)  # the approval holds once
        assert again.is_error and again.meta["sidecar/outcome"] == "escalate"
        assert again.meta["sidecar/escalation_id"] != escalation_id
    assert len(seen.calls) == 1
    invocation = [r for r in evidence(Path(config.evidence.dir)) if r["kind"] == "invocation"]
    assert len(invocation) == 1
    assert invocation[0]["autonomy"] == "human_approved" and invocation[0]["approver"] == ALICE
    assert invocation[0]["escalation_id"] == escalation_id
    assert invocation[0]["rollback_token"] == "undo-42"
    assert verify_dir(Path(config.evidence.dir)).ok


async def test_unknown_obligation_fails_closed_and_is_recorded(gateway):
    sidecar, seen, config = gateway
    async with Client(sidecar.mcp.url) as agent:
        result = await agent.call_tool("docs__weird", {})
    assert result.is_error and "obligation_unknown" in result.content[0].text
    assert not seen.calls
    invocation = [r for r in evidence(Path(config.evidence.dir)) if r["kind"] == "invocation"]
    assert invocation[0]["status"] == "not_called" and invocation[0]["arguments_digest"] == ""


@pytest.mark.parametrize(
    "name, arguments, code",
    [
        ("nosuch__tool", {}, "unknown_tool"),
        ("no-separator", {}, "unknown_tool"),
        ("notes__docs__search", {"query": "x"}, "unknown_tool"),  # looks like the docs upstream's tool
        ("docs__search", {"query": "x" * 1_100_000}, "input_too_large"),
        ("docs__slow", {"seconds": 10}, "upstream_timeout"),
        ("docs__big", {"n": 50_000}, "upstream_too_large"),
    ],
)
async def test_bad_calls_get_clear_error_results_are_recorded_and_the_gateway_keeps_serving(
    gateway, name, arguments, code
):
    sidecar, _, config = gateway
    async with Client(sidecar.mcp.url) as agent:
        result = await agent.call_tool(name, arguments)
        assert result.is_error and code in result.content[0].text, result
        assert not (await agent.call_tool("docs__whoami", {})).is_error  # still serving
    records = evidence(Path(config.evidence.dir))
    assert any(code in " ".join(r.get("reasons", [])) for r in records)


async def test_tool_error_passes_through_as_a_tool_error(gateway):
    sidecar, _, config = gateway
    async with Client(sidecar.mcp.url) as agent:
        result = await agent.call_tool("docs__fail", {})
    assert result.is_error and "fail" in result.content[0].text
    invocation = [r for r in evidence(Path(config.evidence.dir)) if r["kind"] == "invocation"]
    assert invocation[0]["status"] == "tool_error"


@pytest.mark.parametrize("body", [b"{not json", b'{"hello": "world"}', b"[]", b'"jsonrpc"'])
async def test_malformed_json_rpc_is_answered_recorded_and_serving_goes_on(gateway, body):
    sidecar, _, config = gateway
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            sidecar.mcp.url, content=body,
            headers={"content-type": "application/json", "accept": "application/json, text/event-stream"},
        )
    assert response.status_code >= 400 or "error" in response.text
    records = evidence(Path(config.evidence.dir))
    assert any("malformed_request" in " ".join(r.get("reasons", [])) for r in records)
    async with Client(sidecar.mcp.url) as agent:
        assert not (await agent.call_tool("docs__whoami", {})).is_error


async def test_upstream_down_is_an_error_result_and_other_upstreams_keep_serving(gateway_config, running_sidecar):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    config = gateway_config(POLICY, {
        "docs": {"url": f"http://127.0.0.1:{dead_port}/mcp", "timeout_seconds": 1},
        "notes": {"command": [sys.executable, STDIO_SERVER]},
    })
    sidecar = await running_sidecar(config)
    async with Client(sidecar.mcp.url) as agent:
        names = {t.name for t in (await agent.list_tools()).tools}
        assert "notes__search" in names and not any(n.startswith("docs__") for n in names)
        result = await agent.call_tool("docs__whoami", {})
        assert result.is_error and "upstream_unavailable" in result.content[0].text
        assert not (await agent.call_tool("notes__search", {"query": "q"})).is_error
    assert verify_dir(Path(config.evidence.dir)).ok


async def test_resources_and_prompts_are_not_served(gateway):
    sidecar, _, _ = gateway
    from mcp.shared.exceptions import MCPError

    async with Client(sidecar.mcp.url) as agent:
        with pytest.raises(MCPError):
            await agent.list_resources()
        with pytest.raises(MCPError):
            await agent.list_prompts()


async def test_invocations_show_in_evidence_show_and_as_child_spans(gateway, capsys):
    from opentelemetry.sdk.resources import Resource

    from sidecar.cli import main
    from sidecar.evidence.spans import spans_for_record

    sidecar, _, config = gateway
    async with Client(sidecar.mcp.url) as agent:
        assert not (await agent.call_tool("docs__whoami", {})).is_error
    records = evidence(Path(config.evidence.dir))
    decision = next(r for r in records if r["kind"] == "decision")
    invocation = next(r for r in records if r["kind"] == "invocation")
    (span,) = spans_for_record(invocation, lambda _: Resource.create({}))
    decision_span = spans_for_record(decision, lambda _: Resource.create({}))[0]  # then the guardrail span
    assert span.parent.span_id == decision_span.context.span_id
    assert span.context.trace_id == decision_span.context.trace_id
    assert span.name == "sidecar.invocation"
    capsys.readouterr()
    assert main(["evidence", "show", config.evidence.dir]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " invocation " in line]
    assert len(lines) == 1 and "whoami" in lines[0]


async def test_dns_rebinding_a_foreign_host_header_is_refused(gateway):
    sidecar, seen, _ = gateway
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "docs__whoami", "arguments": {}}}
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            sidecar.mcp.url, json=body,
            headers={"host": "evil.example", "accept": "application/json, text/event-stream",
                     "mcp-protocol-version": "2025-06-18"},
        )
    assert response.status_code in (400, 403, 421)
    assert not seen.calls
