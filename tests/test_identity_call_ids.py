"""A call id belongs to one caller's call in one task: another caller, or another task, reusing it
is a different tool call.

`call_id_reused` refuses an id sent again for another tool, server or arguments. The same tool
call sent by another subject (or by the same subject through another delegation chain) with the
same id is a different call too: accepting it gives two callers' decisions, their spans
(`gen_ai.tool.call.id`) and escalations one id, so one agent's call can pass for a repeat of
another's in the evidence. Found by a review: the registry's fingerprint had no caller in it.
The exact call an approval holds for includes its task (escalation/fingerprint.py), so an id
reused under another task is refused too (a dev-mode sidecar is enough for that one). A task
belongs to the agent that started it in the same way (sidecar/tasks.py): another agent's calls
under it were accepted, spending its budget and keeping it alive.
Real JWT-SVIDs from a fake SPIRE Workload API, as in tests/test_escalation_identity.py.
"""

from __future__ import annotations

import grpc
import pytest

from sidecar.client import DELEGATION_METADATA, AsyncClient, delegated_by
from sidecar.identity.delegation import link_audience
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import SIMPLE_POLICY, write_policy
from tests.doubles.escalation import make_config, records
from tests.doubles.identity_harness import bearer, fake_agent, remove_dir, short_dir, until_serving

SIDECAR_ID = "spiffe://example.org/ns/agents/sa/sidecar"
AUD = SIDECAR_ID
DELEGATION = "spiffe://example.org/agent-sidecar/delegation"
PLANNER = "spiffe://example.org/ns/agents/sa/planner"
RESEARCHER = "spiffe://example.org/ns/agents/sa/researcher"
ORCHESTRATOR = "spiffe://example.org/ns/agents/sa/orchestrator"
ALICE = "spiffe://example.org/humans/alice"
QUERY = {"query": "rotation"}


@pytest.fixture
async def world(tmp_path, running_sidecar):
    sockdir = short_dir()
    agent = fake_agent(sockdir, path="/ns/agents/sa/sidecar")
    config = make_config(
        tmp_path,
        **{
            "identity.sources": ["jwt_svid"],
            "identity.workload_api_socket": f"unix://{sockdir}/agent.sock",
            "identity.jwt_audience": AUD,
            "identity.delegation_audience": DELEGATION,
            "identity.workload_api_max_backoff_ms": 100,
            "escalation.approvers": [ALICE],
        },
    )
    sidecar = await running_sidecar(config)
    await until_serving(sidecar.addresses[0])
    yield agent, sidecar, tmp_path
    agent.stop()
    remove_dir(sockdir)


def codes(result) -> list[str]:
    return [reason.split(":")[0] for reason in result.reasons]


async def test_another_caller_cannot_reuse_a_call_id(world):
    agent, sidecar, tmp_path = world
    tcp = sidecar.addresses[0]
    token = lambda who: agent.jwt_authority.mint(who, AUD)  # noqa: E731
    link = lambda who, to: agent.jwt_authority.mint(who, link_audience(DELEGATION, to=to))  # noqa: E731

    async with AsyncClient(tcp, metadata=bearer(token(PLANNER))) as planner:
        first = await planner.authorize("search_docs", QUERY, call_id="call-1")
        assert "call_id_reused" not in codes(first)
        again = await planner.authorize("search_docs", QUERY, call_id="call-1")  # the same caller repeating: fine
        assert "call_id_reused" not in codes(again)
        with delegated_by(link(ORCHESTRATOR, PLANNER)):  # the same agent, on another's behalf
            delegated = await planner.authorize("search_docs", QUERY, call_id="call-1")
        assert delegated.outcome == "deny" and codes(delegated)[0] == "call_id_reused", delegated.reasons

    async with AsyncClient(tcp, metadata=bearer(token(RESEARCHER))) as researcher:
        other = await researcher.authorize("search_docs", QUERY, call_id="call-1")
        assert other.outcome == "deny" and codes(other)[0] == "call_id_reused", other.reasons
        own = await researcher.authorize("search_docs", QUERY, call_id="call-2")  # its own ids are its own
        assert "call_id_reused" not in codes(own)

    decisions = [r for r in records(tmp_path / "evidence") if r["kind"] == "decision" and r["call_id"] == "call-1"]
    callers = {(r["subject"]["spiffe_id"], tuple(d["spiffe_id"] for d in r.get("delegation") or ()))
               for r in decisions if not any(x.startswith("call_id_reused") for x in r["reasons"])}
    assert callers == {(PLANNER, ())}  # one call id, one caller's call


async def test_a_task_is_its_owners_and_its_delegates_and_nobody_elses(world):
    """Another agent's call under a task is denied `not_task_owner` before policy and recorded, and spends
    none of the task's budget; the agents the owner delegated to share it; EndTask is the owner's too."""
    agent, sidecar, tmp_path = world
    tcp = sidecar.addresses[0]
    token = lambda who: agent.jwt_authority.mint(who, AUD)  # noqa: E731
    link = lambda who, to: agent.jwt_authority.mint(who, link_audience(DELEGATION, to=to))  # noqa: E731

    async with AsyncClient(tcp, metadata=bearer(token(PLANNER))) as planner, \
            AsyncClient(tcp, metadata=bearer(token(RESEARCHER))) as researcher:
        with delegated_by(link(ORCHESTRATOR, PLANNER)):
            started = await planner.authorize("search_docs", QUERY, task_id="task-o")
        assert "not_task_owner" not in codes(started), started.reasons
        with delegated_by(link(ORCHESTRATOR, RESEARCHER)):
            shared = await researcher.authorize("search_docs", QUERY, task_id="task-o")
        assert "not_task_owner" not in codes(shared), shared.reasons
        intruder = await researcher.authorize("search_docs", QUERY, task_id="task-o")  # on its own behalf
        assert intruder.outcome == "deny" and codes(intruder) == ["not_task_owner"], intruder.reasons
        own = await planner.authorize("search_docs", QUERY, task_id="task-o")
        assert own.outcome == "deny" and codes(own) == ["not_task_owner"]
    async with grpc.aio.insecure_channel(tcp) as channel:
        end_task = sidecar_pb2_grpc.ToolGateStub(channel).EndTask
        request = sidecar_pb2.EndTaskRequest(task_id="task-o")
        as_researcher = (("authorization", f"Bearer {token(RESEARCHER)}"),)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await end_task(request, metadata=as_researcher)  # on its own behalf
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert refused.value.details().startswith("not_task_owner: ")
        for_orchestrator = (*as_researcher, (DELEGATION_METADATA, link(ORCHESTRATOR, RESEARCHER)))
        ended = await end_task(request, metadata=for_orchestrator)
        assert not ended.already_ended
    async with AsyncClient(tcp, metadata=bearer(token(RESEARCHER))) as researcher:
        with delegated_by(link(ORCHESTRATOR, RESEARCHER)):
            after = await researcher.authorize("search_docs", QUERY, task_id="task-o")
    assert codes(after) == ["task_ended"]

    decisions = [r for r in records(tmp_path / "evidence") if r["kind"] == "decision" and r.get("task_id") == "task-o"]
    refused_records = [r for r in decisions if r["reasons"][0].startswith("not_task_owner: ")]
    assert [r["decision_id"] for r in refused_records] == [intruder.decision_id, own.decision_id]
    assert all(r["outcome"] == "deny" and "input" not in r for r in refused_records)  # denied before policy
    counted = [r["input"]["usage"]["calls_in_task"] for r in decisions if "input" in r]
    assert counted == [1, 2]  # the refused calls spent none of the task's budget


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
