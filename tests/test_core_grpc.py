"""ToolGate.Authorize through a real gRPC server, over loopback TCP and a unix socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar.client import AsyncClient, build_request
from sidecar.config import ConfigError
from sidecar.policy.catalog import read_data
from sidecar.server import start_sidecar
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import REGO


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_allow_deny_escalate_over_each_listener(sidecar, transport):
    address = next(a for a in sidecar.addresses if a.startswith("unix:") == (transport == "unix"))
    async with AsyncClient(address) as client:
        allowed = await client.authorize("read_file", {"path": "/workspace/notes.txt"}, task_id="t-1")
        denied = await client.authorize("not_a_tool", {})
        escalated = await client.authorize("send_email", {"to": ["cfo@example.com"], "subject": "Q3", "body": "hi"})

    assert allowed.outcome == "allow", allowed.reasons
    assert denied.outcome == "deny"
    assert any(r.startswith("tool_not_in_catalog:") for r in denied.reasons)
    assert escalated.outcome == "escalate", escalated.reasons
    for result in (allowed, denied, escalated):
        assert result.reasons and all(result.reasons)
        assert result.decision_id and result.policy_revision == sidecar.policy.revision
        assert len(result.trace_id) == 32
    assert len({allowed.decision_id, denied.decision_id, escalated.decision_id}) == 3


async def test_deny_is_a_normal_response_not_a_grpc_error(sidecar):
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        call = stub.Authorize(build_request("not_a_tool", {}))
        response = await call
        assert await call.code() == grpc.StatusCode.OK
    assert response.outcome == sidecar_pb2.OUTCOME_DENY


@pytest.mark.parametrize(
    "tool, arguments, code",
    [
        ("", {}, "invalid_tool"),
        ("x" * 257, {}, "invalid_tool"),
        ("unknown_tool", {}, "tool_not_in_catalog"),
        ("read_file", {"blob": "x" * (1024 * 1024 + 10)}, "input_too_large"),
    ],
)
async def test_bad_calls_are_denied_with_a_reason_and_the_server_keeps_serving(client, tool, arguments, code):
    result = await client.authorize(tool, arguments)
    assert result.outcome == "deny"
    assert any(r.startswith(code + ":") for r in result.reasons), result.reasons
    follow_up = await client.authorize("read_file", {"path": "/workspace/a.txt"})
    assert follow_up.outcome == "allow"


async def test_arguments_nested_past_the_depth_cap_are_denied(running_sidecar, sidecar_config):
    # Protobuf refuses messages nested past ~50 JSON levels (those are answered
    # INVALID_ARGUMENT, see the fuzz suite), so the cap is tested below that.
    sidecar = await running_sidecar(sidecar_config(**{"policy.max_depth": 8}))
    deep: dict = {}
    node = deep
    for _ in range(12):
        node["d"] = {}
        node = node["d"]
    async with AsyncClient(sidecar.addresses[0]) as client:
        result = await client.authorize("read_file", {"path": "/workspace/a", "nested": deep})
        shallow = await client.authorize("read_file", {"path": "/workspace/a", "nested": {"d": {"d": 1}}})
    assert result.outcome == "deny"
    assert any(r.startswith("input_too_deep:") for r in result.reasons)
    assert not any(r.startswith("input_too_deep:") for r in shallow.reasons)


async def test_a_call_id_reused_with_other_arguments_is_denied(client):
    first = await client.authorize("read_file", {"path": "/workspace/a.txt"}, call_id="call-42")
    same = await client.authorize("read_file", {"path": "/workspace/a.txt"}, call_id="call-42")
    other = await client.authorize("read_file", {"path": "/workspace/b.txt"}, call_id="call-42")
    assert first.outcome == "allow" and same.outcome == "allow"
    assert other.outcome == "deny"
    assert any(r.startswith("call_id_reused:") for r in other.reasons)


async def test_a_message_with_invalid_utf8_is_invalid_argument_and_serving_continues(sidecar, client):
    valid = build_request("read_file", {"path": "/workspace/a"}).SerializeToString()
    # Field 1 (tool), length-delimited, holding bytes that are not UTF-8.
    broken = b"\x0a\x03\xff\xfe\xfd" + valid
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        raw = channel.unary_unary(
            "/sidecar.v1.ToolGate/Authorize",
            request_serializer=lambda b: b,
            response_deserializer=sidecar_pb2.AuthorizeResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await raw(broken)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed_request" in failure.value.details()
    assert "recorded as decision" in failure.value.details()
    assert (await client.authorize("read_file", {"path": "/workspace/a"})).outcome == "allow"


async def test_health_and_reflection_are_served(sidecar):
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "sidecar.v1.ToolGate"):
            call = health.Check(health_pb2.HealthCheckRequest(service=service))
            answer = await call
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        trailing = dict(await call.trailing_metadata())
        assert "policy: ok" in trailing["sidecar-health-detail"]

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = set()
        async for response in responses:
            names |= {s.name for s in response.list_services_response.service}
            break
    assert {"sidecar.v1.ToolGate", "grpc.health.v1.Health"} <= names


async def test_usage_counter_feeds_the_rate_rule(sidecar, client):
    limit = read_data(REGO)[0]["sidecar"]["limits"]["max_calls_in_window"]
    results = [await client.authorize("create_ticket", {"title": f"t{i}"}) for i in range(limit + 1)]
    assert all(r.outcome == "allow" for r in results[:limit]), results[0].reasons
    assert results[-1].outcome == "deny"
    assert any(r.startswith("rate_limited:") for r in results[-1].reasons)
    # The window is per (subject, tool): another tool is unaffected.
    assert (await client.authorize("search_docs", {"query": "x"})).outcome == "allow"


async def test_a_start_that_fails_part_way_closes_what_had_started(sidecar_config, tmp_path):
    """The MCP gateway cannot bind (its port is taken) after policy, evidence and gRPC have started:
    the start raises, and everything started before is closed (no OPA left, the evidence log free)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    config = sidecar_config(**{"mcp.listen": f"127.0.0.1:{port}"})
    before = opa_children()
    try:
        with pytest.raises(ConfigError, match=f"mcp.listen: cannot listen on 127.0.0.1:{port}"):
            await start_sidecar(config)
    finally:
        taken.close()
    assert opa_children() == before  # the managed OPA it started is gone
    sidecar = await start_sidecar(config)  # same evidence dir: its lock was released
    try:
        assert sidecar.mcp is not None and sidecar.policy.revision
    finally:
        await sidecar.stop(grace=0)
    assert opa_children() == before


def opa_children() -> set[int]:
    """This process's child processes that run OPA."""
    found = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # that thread ended meanwhile (an executor's, the evidence writer's)
            continue
        for child in children:
            try:
                if "opa" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].decode():
                    found.add(int(child))
            except FileNotFoundError:
                pass
    return found
