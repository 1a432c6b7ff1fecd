"""The MCP gateway decides only on arguments the upstream tool reads as they are, defaults included.

Tools built with the MCP SDK (MCPServer) validate their arguments with pydantic in lax mode:
`"true"`, `"yes"` and `1` run as the boolean true, `"5000"` and `"5_000"` as the integer 5000,
`"inf"` as Infinity, `true` as the integer 1, and a string holding JSON text (`"null"`,
`'["/a", "/b"]'`) as the value it spells. Policy saw a string where the tool ran with a boolean: a
rule denying `recursive == true` let `"recursive": "true"` through and the tool ran recursive.
Now the gateway checks each call against the input schema the upstream declared for the tool,
without coercion, and denies what does not match (`invalid_arguments`, naming the field, never the
value): recorded, and the upstream is never called. And a tool ran an argument the call left out
with its own default, which policy never saw (`recursive: bool = True`): the gateway fills in the
defaults the schema declares, so policy decides on them and the tool is sent them. Real servers: the SDK's client, the sidecar,
OPA, and MCPServer upstreams over Streamable HTTP and stdio.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp.client.client import Client
from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel

from sidecar.evidence.verify import verify_dir
from sidecar.invoke.mcp import McpUpstream
from tests.infra.invoke import records
from tests.mcp_upstreams import STDIO_SERVER, serve_http

POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "escalate", "reasons": ["needs_approval: a recursive purge"], "obligations": {}} if {
        input.tool.name == "purge"
        input.tool.arguments.recursive == true
        input.approval == null
    } else := {"outcome": "allow", "reasons": ["approved: recursive purge"], "obligations": {}} if {
        input.tool.name == "purge"
        input.tool.arguments.recursive == true
    } else := {"outcome": "deny", "reasons": ["too_wide: never recursive"], "obligations": {}} if {
        input.tool.arguments.recursive == true
    } else := {"outcome": "deny", "reasons": ["too_wide: never forced"], "obligations": {}} if {
        input.tool.arguments.options.force == true
    } else := {"outcome": "deny", "reasons": ["too_wide: never on"], "obligations": {}} if {
        input.tool.arguments.on == true
    } else := {"outcome": "allow", "reasons": ["ok: files"], "obligations": {}} if {
        input.tool.name in {"remove", "flag", "purge"}
    }
"""


class Options(BaseModel):
    force: bool = False


class Forceful(BaseModel):
    force: bool = True


def files_server(received: list[dict[str, Any]]) -> MCPServer:
    srv = MCPServer("files")

    @srv.tool()
    def remove(path: str, recursive: bool = False, amount: int = 0, ratio: float = 0.0, ids: list[int] | None = None,
               note: str | None = "", targets: str | list[str] = "", options: Options | None = None) -> str:
        """Removes files; keeps what it ran with."""
        ran = {"path": path, "recursive": recursive, "amount": amount, "ratio": ratio, "ids": ids, "note": note,
               "targets": targets, "options": options.model_dump() if options else None}
        received.append(ran)
        return json.dumps(ran)

    @srv.tool()
    def purge(path: str, recursive: bool = True, options: Forceful | None = None) -> str:
        """Purges files, recursive unless told otherwise; keeps what it ran with."""
        ran = {"path": path, "recursive": recursive, "options": options.model_dump() if options else None}
        received.append(ran)
        return json.dumps(ran)

    return srv


@pytest.fixture
async def gateway(gateway_config, running_sidecar):
    received: list[dict[str, Any]] = []
    upstream = await serve_http(files_server(received))
    config = gateway_config(POLICY, {"files": {"url": upstream.url, "timeout_seconds": 4},
                                     "notes": {"command": [sys.executable, STDIO_SERVER], "timeout_seconds": 10}})
    sidecar = await running_sidecar(config)
    yield sidecar, received, config
    await upstream.stop()


COERCED = {
    # the argument as sent → the field the refusal names (what the SDK's tool would have run with)
    "a string for a boolean": ({"recursive": "true"}, "arguments.recursive"),  # True
    "yes for a boolean": ({"recursive": "yes"}, "arguments.recursive"),  # True
    "a number for a boolean": ({"recursive": 1}, "arguments.recursive"),  # True
    "a string for an integer": ({"amount": "5000"}, "arguments.amount"),  # 5000
    "a padded string for an integer": ({"amount": " 5_000 "}, "arguments.amount"),  # 5000
    "a boolean for an integer": ({"amount": True}, "arguments.amount"),  # 1
    "inf for a number": ({"ratio": "inf"}, "arguments.ratio"),  # Infinity
    "JSON text for a list": ({"ids": "[1, 2]"}, "arguments.ids"),  # [1, 2]
    "null text for an optional string": ({"note": "null"}, "arguments.note"),  # None
    "JSON text where a list is also taken": ({"targets": '["/", "/etc"]'}, "arguments.targets"),  # a list
    "a string for a nested boolean": ({"options": {"force": "on"}}, "arguments.options.force"),  # True
    "a required argument missing": ({"path": None}, "arguments"),
    "two spellings of one name": ({"recursive": False, "RECURSIVE": True}, "arguments"),  # the gate's check
}


@pytest.mark.parametrize("sent, field", COERCED.values(), ids=COERCED.keys())
async def test_arguments_the_tool_would_read_as_another_value_are_denied_naming_the_field(gateway, sent, field):
    sidecar, received, config = gateway
    arguments = {"path": "/srv/data", **sent}
    arguments = {k: v for k, v in arguments.items() if v is not None}
    async with Client(sidecar.mcp.url) as agent:
        result = await agent.call_tool("files__remove", arguments)
    text = result.content[0].text
    assert result.is_error and f"invalid_arguments: {field} " in text, text
    assert received == []  # the tool never ran
    decisions = [r for r in records(config.evidence.dir) if r["kind"] == "decision"]
    assert [d["outcome"] for d in decisions] == ["deny"]
    assert decisions[0]["reasons"][0].startswith(f"invalid_arguments: {field} ")
    assert not [r for r in records(config.evidence.dir) if r["kind"] == "invocation"]
    for value in sent.values():  # the reason names the field, never the value (short ones are words of its text)
        if isinstance(value, str) and len(value) > 4:
            assert value not in decisions[0]["reasons"][0]
    assert verify_dir(Path(config.evidence.dir)).ok


async def test_arguments_the_tool_reads_as_they_are_run_with_exactly_the_decided_values(gateway):
    sidecar, received, config = gateway
    sent = {"path": "null", "recursive": False, "amount": 5.0, "ratio": 0.5, "ids": [1, 2], "note": "[REDACTED]",
            "targets": "/srv/data/a", "options": {"force": False}}
    async with Client(sidecar.mcp.url) as agent:
        result = await agent.call_tool("files__remove", sent)
        assert not result.is_error, result
        policy_said = await agent.call_tool("files__remove", {"path": "/", "recursive": True})
    assert received == [{**sent, "amount": 5}]
    assert "too_wide: never recursive" in policy_said.content[0].text and len(received) == 1


async def test_over_stdio_too_and_a_tool_the_upstream_does_not_list_is_unknown(gateway):
    sidecar, _, config = gateway
    async with Client(sidecar.mcp.url) as agent:
        coerced = await agent.call_tool("notes__flag", {"on": "true"})
        policy_said = await agent.call_tool("notes__flag", {"on": True})
        off = await agent.call_tool("notes__flag", {"on": False})
        unlisted = await agent.call_tool("files__shred", {"path": "/"})
    assert coerced.is_error and "invalid_arguments: arguments.on " in coerced.content[0].text, coerced
    assert policy_said.is_error and "too_wide: never on" in policy_said.content[0].text
    assert off.content[0].text == "on=False"
    assert unlisted.is_error and "unknown_tool: upstream files lists no tool 'shred'" in unlisted.content[0].text
    outcomes = [(d["tool"], d["outcome"]) for d in records(config.evidence.dir) if d["kind"] == "decision"]
    assert outcomes == [("flag", "deny"), ("flag", "deny"), ("flag", "allow"), ("shred", "deny")]


async def test_defaults_the_tool_would_run_with_are_decided_on_approved_and_sent(gateway):
    """A purge left without `recursive` runs recursive (the tool's default): policy escalates it,
    the approver reads `recursive: true`, and the approved call runs with exactly that."""
    from sidecar.canonical import canonical_json, sha256_digest
    from sidecar.escalation.client import ApprovalsClient

    sidecar, received, config = gateway
    async with Client(sidecar.mcp.url) as agent, ApprovalsClient(sidecar.addresses[0]) as approvals:
        left_out = await agent.call_tool("files__purge", {"path": "/srv"})
        nested = await agent.call_tool("files__purge", {"path": "/srv", "recursive": False, "options": {}})
        explicit = await agent.call_tool("files__purge", {"path": "/srv", "recursive": False, "options": None})
        assert left_out.is_error and "needs_approval: a recursive purge" in left_out.content[0].text, left_out
        escalation_id = left_out.meta["sidecar/escalation_id"]
        shown = await approvals.get(escalation_id, approver="email:alice@example.org")
        assert shown["arguments"] == {"path": "/srv", "recursive": True}  # a null default stays left out
        await approvals.approve(escalation_id, approver="email:alice@example.org")
        approved = await agent.call_tool("files__purge", {"path": "/srv"})
        assert not approved.is_error, approved
    assert nested.is_error and "too_wide: never forced" in nested.content[0].text, nested
    assert not explicit.is_error, explicit
    assert received == [{"path": "/srv", "recursive": False, "options": None},
                        {"path": "/srv", "recursive": True, "options": None}]
    decisions = [r for r in records(config.evidence.dir) if r["kind"] == "decision"]
    invocations = [r for r in records(config.evidence.dir) if r["kind"] == "invocation"]
    decided = [{"path": "/srv", "recursive": True}, {"path": "/srv", "recursive": False, "options": {"force": True}},
               {"path": "/srv", "recursive": False, "options": None}, {"path": "/srv", "recursive": True}]
    assert [d["arguments_digest"] for d in decisions] == [sha256_digest(canonical_json(a)) for a in decided]
    assert [i["arguments_digest"] for i in invocations] == [decisions[2]["arguments_digest"],
                                                            decisions[3]["arguments_digest"]]
    assert invocations[1]["approver"] == "email:alice@example.org"


async def test_a_tools_schema_is_made_ready_once_per_listing_not_per_call():
    """Checking a schema against its meta-schema and building its validators costs milliseconds of the
    event loop: an upstream makes it once for the schema its listing gives and reuses it for every call,
    until a listing gives another schema for that tool."""
    upstream_server = await serve_http(files_server([]))
    upstream = McpUpstream("files", url=upstream_server.url, timeout_seconds=10)
    upstream.start()
    try:
        first = await upstream.input_schema("remove")
        assert first is not None and first.problem is None
        assert await upstream.input_schema("remove") is first
        await upstream.tools()  # listed again, the same schema: still the one made before
        assert await upstream.input_schema("remove") is first
        assert await upstream.input_schema("purge") is not first
        assert await upstream.input_schema("no_such_tool") is None
        filled, problem = first.read({"path": "/srv", "recursive": "true"})
        assert problem is not None and problem.startswith("arguments.recursive does not match"), problem
    finally:
        await upstream.aclose()
        await upstream_server.stop()
