"""Adversarial review of the serving surfaces: each test is a fault found by sending a real
sidecar (real OPA, real evidence log) input it did not expect, kept so it stays fixed.

- A task id every call accepts must be one EndTask accepts: else a task can be used but never
  ended (tabs, no-break spaces, zero-width and escape characters in the id).
- ToolGate.Invoke makes the call itself, to the HTTP tool `invoke.tools` names: a `server` the
  caller names would reach policy, approvals and evidence but not the call, so policy could
  decide on a server the call never goes to (and an approval for another server's tool of the
  same name could be spent on the HTTP tool).
"""

from __future__ import annotations

import contextlib

import grpc
import pytest
from aiohttp import web

from sidecar.evidence.verify import verify_dir
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import SIMPLE_POLICY, write_policy
from tests.infra.http import serve_app
from tests.infra.invoke import records

ODD_TASK_IDS = ["task\t1", "task\u00a01", "t\u200b", "t\x1b[31m", "t\u202egnp.exe", "line\nbreak", "t\x7f"]


@pytest.mark.parametrize("task_id", ODD_TASK_IDS)
async def test_a_task_any_call_may_use_can_be_ended(tmp_path, sidecar_config, running_sidecar, task_id):
    sidecar = await running_sidecar(sidecar_config(**{
        "listen.unix": "", "policy.dir": str(write_policy(tmp_path / "policy", SIMPLE_POLICY)),
    }))
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        first = await stub.Authorize(sidecar_pb2.AuthorizeRequest(tool="echo", task_id=task_id))
        assert first.outcome == sidecar_pb2.OUTCOME_ALLOW, first.reasons
        ended = await stub.EndTask(sidecar_pb2.EndTaskRequest(task_id=task_id))
        assert ended.task_id == task_id and not ended.already_ended and ended.evidence_hash
        after = await stub.Authorize(sidecar_pb2.AuthorizeRequest(tool="echo", task_id=task_id))
        assert after.outcome == sidecar_pb2.OUTCOME_DENY and after.reasons[0].startswith("task_ended:")
    log = records(tmp_path / "evidence")
    assert [r["task_id"] for r in log if r["kind"] == "task_end"] == [task_id]
    assert verify_dir(tmp_path / "evidence").ok


@pytest.mark.parametrize("task_id, code", [
    ("", grpc.StatusCode.INVALID_ARGUMENT),
    ("x" * 257, grpc.StatusCode.INVALID_ARGUMENT),
    ("a\x00b", grpc.StatusCode.INVALID_ARGUMENT),  # no call may use it either (invalid_task_id)
])
async def test_end_task_still_refuses_ids_no_call_may_use(tmp_path, sidecar_config, running_sidecar, task_id, code):
    sidecar = await running_sidecar(sidecar_config(**{
        "listen.unix": "", "policy.dir": str(write_policy(tmp_path / "policy", SIMPLE_POLICY)),
    }))
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        if task_id:
            call = await stub.Authorize(sidecar_pb2.AuthorizeRequest(tool="echo", task_id=task_id))
            assert call.outcome == sidecar_pb2.OUTCOME_DENY and call.reasons[0].startswith("invalid_task_id:")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.EndTask(sidecar_pb2.EndTaskRequest(task_id=task_id))
        assert info.value.code() == code and info.value.details().startswith("invalid_task:")


INVOKE_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    # A policy that trusts tool.server: the sandbox copy of the tool may run freely.
    decision := {"outcome": "allow", "reasons": ["sandbox: free to run"], "obligations": {}} if {
        input.tool.name == "drop_table"
        input.tool.server == "sandbox"
    }

    decision := {"outcome": "escalate", "reasons": ["production: needs approval"], "obligations": {}} if {
        input.tool.name == "drop_table"
        input.tool.server != "sandbox"
        input.approval == null
    }

    decision := {"outcome": "allow", "reasons": ["approved"], "obligations": {}} if {
        input.tool.name == "drop_table"
        input.tool.server != "sandbox"
        input.approval != null
    }
"""


@contextlib.asynccontextmanager
async def recording_tool(path: str, answer: dict):
    """A real HTTP tool on loopback that answers POST `path` with `answer`: (its base URL, the bodies it got)."""
    bodies: list[dict] = []

    async def handle(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post(path, handle)
    async with serve_app(app) as base:
        yield base, bodies


@pytest.fixture
async def production_tool():
    async with recording_tool("/drop", {"dropped": True}) as tool:
        yield tool


async def invoke_sidecar(tmp_path, sidecar_config, running_sidecar, base):
    return await running_sidecar(sidecar_config(**{
        "listen.unix": "",
        "policy.dir": str(write_policy(tmp_path / "policy", INVOKE_POLICY)),
        "invoke.tools": {"drop_table": {"method": "POST", "url": base + "/drop"}},
    }))


@pytest.mark.parametrize("server", ["sandbox", "prod", "Sandbox", " "])
async def test_invoke_refuses_a_server_the_caller_names(tmp_path, sidecar_config, running_sidecar, production_tool,
                                                         server):
    base, calls = production_tool
    sidecar = await invoke_sidecar(tmp_path, sidecar_config, running_sidecar, base)
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        answer = await stub.Invoke(sidecar_pb2.InvokeRequest(call=sidecar_pb2.AuthorizeRequest(
            tool="drop_table", server=server, call_id="c-1",
        )))
    assert answer.decision.outcome == sidecar_pb2.OUTCOME_DENY, answer
    assert answer.decision.reasons[0].startswith("invalid_server:"), answer.decision.reasons
    assert answer.status == "" and calls == []  # the production tool was never called
    decision = next(r for r in records(tmp_path / "evidence") if r["kind"] == "decision")
    assert decision["outcome"] == "deny" and decision["server"] == server and decision["call_id"] == "c-1"


async def test_invoke_without_a_server_is_decided_as_the_http_tool_and_escalates(
        tmp_path, sidecar_config, running_sidecar, production_tool):
    base, calls = production_tool
    sidecar = await invoke_sidecar(tmp_path, sidecar_config, running_sidecar, base)
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        answer = await stub.Invoke(sidecar_pb2.InvokeRequest(call=sidecar_pb2.AuthorizeRequest(tool="drop_table")))
    assert answer.decision.outcome == sidecar_pb2.OUTCOME_ESCALATE, answer
    assert answer.status == "" and calls == []


async def test_a_call_id_is_one_tasks_call(tmp_path, sidecar_config, running_sidecar):
    """The exact call an approval holds for includes its task (escalation/fingerprint.py); a call id
    reused under another task named two calls, with two tasks' budgets and endings, in one id."""
    sidecar = await running_sidecar(sidecar_config(**{
        "listen.unix": "", "policy.dir": str(write_policy(tmp_path / "policy", SIMPLE_POLICY)),
    }))
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)

        async def echo(task_id: str, call_id: str = "call-1") -> sidecar_pb2.AuthorizeResponse:
            return await stub.Authorize(sidecar_pb2.AuthorizeRequest(tool="echo", call_id=call_id, task_id=task_id))

        assert (await echo("task-1")).outcome == sidecar_pb2.OUTCOME_ALLOW
        assert (await echo("task-1")).outcome == sidecar_pb2.OUTCOME_ALLOW  # the same call repeated: fine
        other = await echo("task-2")
        assert other.outcome == sidecar_pb2.OUTCOME_DENY and other.reasons[0].startswith("call_id_reused:")
        untasked = await echo("")
        assert untasked.outcome == sidecar_pb2.OUTCOME_DENY and untasked.reasons[0].startswith("call_id_reused:")
        # A task id is not confused with the fields around it (it may hold a newline since calls take it).
        assert (await echo("a\nb", "call-2")).outcome == sidecar_pb2.OUTCOME_ALLOW
        assert (await echo("a\nb", "call-2")).outcome == sidecar_pb2.OUTCOME_ALLOW
    decisions = [r for r in records(tmp_path / "evidence") if r["kind"] == "decision" and r["call_id"] == "call-1"
                 and r["outcome"] == "allow"]
    assert {r["task_id"] for r in decisions} == {"task-1"}


CLAMP_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok: search, at most 5 results, no debug, no token"], "obligations": {
        "clamp_arguments": {"limit": 5}, "drop_arguments": ["debug"], "redact_call_arguments": ["token"],
        "cap_list_arguments": {"tags": 1},
    }} if input.tool.name == "search"
"""


@pytest.fixture
async def search_tool():
    async with recording_tool("/search", {"ok": True}) as tool:
        yield tool


# Many tools read argument names without case (ASP.NET's model binding, Jackson or System.Text.Json set
# to be case-insensitive), some after NFKC folding: there `LIMIT` or a fullwidth `ｌｉｍｉｔ` is the
# `limit` the obligation clamps, and a second spelling beside it may win. Such a call is not made.
@pytest.mark.parametrize("arguments", [
    {"LIMIT": 1000},
    {"limit": 3, "Limit": 1000},
    {"\uff4c\uff49\uff4d\uff49\uff54": 1000},  # fullwidth "limit"
    {"Debug": True},
    {"TOKEN": "secret-1"},
    {"Tags": ["a", "b", "c"]},
])
async def test_an_obligation_cannot_be_sidestepped_by_another_spelling_of_the_argument(
        tmp_path, sidecar_config, running_sidecar, search_tool, arguments):
    base, bodies = search_tool
    sidecar = await running_sidecar(sidecar_config(**{
        "listen.unix": "", "policy.dir": str(write_policy(tmp_path / "policy", CLAMP_POLICY)),
        "invoke.tools": {"search": {"method": "POST", "url": base + "/search"}},
    }))
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        request = sidecar_pb2.AuthorizeRequest(tool="search")
        request.arguments.update({"query": "q", **arguments})
        answer = await stub.Invoke(sidecar_pb2.InvokeRequest(call=request))
        assert answer.decision.outcome == sidecar_pb2.OUTCOME_ALLOW
        assert answer.status == "not_called" and answer.error.startswith("obligation_inapplicable:"), answer
        assert bodies == []
        plain = sidecar_pb2.AuthorizeRequest(tool="search")
        plain.arguments.update({"query": "q", "limit": 50, "debug": True, "token": "t", "tags": ["a", "b"]})
        fine = await stub.Invoke(sidecar_pb2.InvokeRequest(call=plain))
        assert fine.status == "ok", fine
    assert bodies == [{"query": "q", "limit": 5, "token": "[REDACTED]", "tags": ["a"]}]
    invocation = [r for r in records(tmp_path / "evidence") if r["kind"] == "invocation"][0]
    assert invocation["status"] == "not_called"


@pytest.mark.parametrize("task_id", [
    "t", "a\tb", "a\u00a0b", "a\u200bb", "\x1b[31m", "x" * 256, "x" * 257, "ü" * 128, "ü" * 129,
    "a\x00b", "\x00", "a\ud800", "",
])
def test_endtask_takes_exactly_the_task_ids_a_call_may_use(task_id):
    """EndTask's rule (calls.usable_id, plus not empty) and check_call's agree on every id."""
    from sidecar.calls import ToolCall, check_call, usable_id

    problems, _ = check_call(ToolCall(tool="t", arguments={}, task_id=task_id), max_bytes=1 << 20, max_depth=32)
    call_takes = bool(task_id) and not any(p.startswith("invalid_task_id: ") for p in problems)
    assert (bool(task_id) and usable_id(task_id)) == call_takes
