"""Task lifetimes: EndTask(task_id) and the idle timeout end a task; every later call under it is
denied (task_ended) and recorded, through Authorize, Invoke and the MCP gateway alike."""

from __future__ import annotations

import grpc
import pytest
from mcp.client.client import Client

from sidecar.tasks import TaskOwnerMismatch, TaskRegistry
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import SIMPLE_POLICY, write_policy
from tests.mcp_upstreams import Seen, docs_server, serve_http

ALICE = "spiffe://example.org/alice"
BOB = "spiffe://example.org/bob"


def test_idle_tasks_end_and_stay_ended():
    now = [0.0]
    tasks = TaskRegistry(idle_seconds=60, max_tracked=100, clock=lambda: now[0], wall_clock=lambda: 0.0)
    assert tasks.check("t", ALICE) is None
    now[0] = 59
    assert tasks.check("t", ALICE) is None  # each call restarts the idle clock
    now[0] = 119
    assert tasks.check("t", ALICE) is None
    now[0] = 180
    refusal = tasks.check("t", ALICE)
    assert refusal.startswith("task_ended: task 't' ended after 60 s without calls")
    now[0] = 181
    assert tasks.check("t", ALICE).startswith("task_ended:")  # ended for good


def test_only_the_tasks_subject_may_end_it():
    tasks = TaskRegistry(idle_seconds=0, max_tracked=100)
    assert tasks.check("t", ALICE) is None
    with pytest.raises(TaskOwnerMismatch):
        tasks.end("t", BOB)
    assert tasks.check("t", ALICE) is None  # Bob's attempt changed nothing
    at, already = tasks.end("t", ALICE)
    assert not already and at.endswith("Z")
    assert tasks.end("t", ALICE) == (at, True)
    with pytest.raises(TaskOwnerMismatch):
        tasks.end("t", BOB)
    assert tasks.check("t", ALICE).startswith("task_ended: task 't' was ended by EndTask at")
    assert tasks.check("other", ALICE) is None


async def test_end_task_over_grpc_then_calls_under_it_are_denied_everywhere(tmp_path, sidecar_config, running_sidecar):
    seen = Seen()
    upstream = await serve_http(docs_server(seen))
    policy = write_policy(tmp_path / "policy", SIMPLE_POLICY.replace('["echo", "search_docs"]', '["echo", "whoami"]'))
    sidecar = await running_sidecar(sidecar_config(**{
        "listen.unix": "", "policy.dir": str(policy),
        "mcp.listen": "127.0.0.1:0", "mcp.upstreams": {"docs": {"url": upstream.url}},
    }))
    try:
        async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel, Client(sidecar.mcp.url) as agent:
            stub = sidecar_pb2_grpc.ToolGateStub(channel)
            first = await stub.Authorize(sidecar_pb2.AuthorizeRequest(tool="echo", task_id="task-1"))
            assert first.outcome == sidecar_pb2.OUTCOME_ALLOW
            meta = {"sidecar/task_id": "task-1"}
            assert not (await agent.call_tool("docs__whoami", {}, meta=meta)).is_error
            ended = await stub.EndTask(sidecar_pb2.EndTaskRequest(task_id="task-1"))
            assert ended.task_id == "task-1" and not ended.already_ended and ended.ended_at
            again = await stub.EndTask(sidecar_pb2.EndTaskRequest(task_id="task-1"))
            assert again.already_ended and again.ended_at == ended.ended_at
            after = await stub.Authorize(sidecar_pb2.AuthorizeRequest(tool="echo", task_id="task-1"))
            assert after.outcome == sidecar_pb2.OUTCOME_DENY and after.reasons[0].startswith("task_ended:")
            through_mcp = await agent.call_tool("docs__whoami", {}, meta=meta)
            assert through_mcp.is_error and "task_ended" in through_mcp.content[0].text
            assert len(seen.calls) == 1
            other = await stub.Authorize(sidecar_pb2.AuthorizeRequest(tool="echo", task_id="task-2"))
            assert other.outcome == sidecar_pb2.OUTCOME_ALLOW
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.EndTask(sidecar_pb2.EndTaskRequest(task_id=""))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await upstream.stop()
