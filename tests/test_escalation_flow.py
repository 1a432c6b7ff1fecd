"""Escalation end to end over gRPC: a real sidecar, on SQLite and on a real PostgreSQL.

Dev identity: the agent is spiffe://dev.local/agent, and approvers name
themselves in the request's approver field (honoured only in dev mode). The
policy is tests/doubles/escalation.py's (send_email escalates, an approval
satisfies it; wire_money needs a finance approver).
"""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest

from sidecar.client import AsyncClient, AuthorizationDenied, Client, EscalationRequired
from sidecar.escalation.client import ApprovalsClient, ApprovalsError
from sidecar.evidence.verify import verify_dir
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import BIG_CALLS
from tests.doubles.escalation import (
    AGENT,
    ALICE,
    BOB,
    CFO,
    make_config,
    records,
    records_of,
    store_kind,  # noqa: F401  (fixture)
    store_settings,
    until_pending,
)

EMAIL = {"to": "cfo@example.com", "body": "Q3 numbers", "api_token": "s3cret-token"}


@pytest.fixture
def config(tmp_path, store_kind):
    store = store_settings(store_kind, tmp_path)

    def make(**overrides):
        return make_config(tmp_path, store, **overrides)

    return make


async def await_decision(address: str, escalation_id: str, timeout: float = 0.0):
    """One raw AwaitDecision (the agent SDK's await_decision repeats it until decided), with the
    generated ToolGate stub on its own channel: the response as sent, or the grpc.aio.AioRpcError."""
    async with grpc.aio.insecure_channel(address) as channel:
        return await sidecar_pb2_grpc.ToolGateStub(channel).AwaitDecision(
            sidecar_pb2.AwaitDecisionRequest(escalation_id=escalation_id, timeout_seconds=timeout),
            timeout=(timeout if math.isfinite(timeout) else 0) + 5,
        )


async def refused(call) -> ApprovalsError:
    with pytest.raises(ApprovalsError) as info:
        await call
    return info.value


async def test_full_flow_escalate_wait_approve_repeat_once(config, running_sidecar, tmp_path):
    sidecar = await running_sidecar(config())
    address = sidecar.addresses[0]
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        first = await agent.authorize("send_email", EMAIL, task_id="t-1", call_id="call-1")
        assert first.outcome == "escalate" and first.escalation_id.startswith("esc-")
        assert first.reasons == ("high_risk_tool: a human approves this tool",)
        again = await agent.authorize("send_email", EMAIL, task_id="t-1", call_id="call-2")
        assert again.escalation_id == first.escalation_id  # the same call while pending: no second escalation

        pending = await approvals.list(state="pending")
        assert [e["escalation_id"] for e in pending] == [first.escalation_id]
        shown = pending[0]
        assert shown["subject"] == AGENT and shown["tool"] == "send_email" and shown["task_id"] == "t-1"
        assert shown["arguments_preview"] == {"to": "cfo@example.com", "body": "Q3 numbers", "api_token": "[REDACTED]"}
        assert shown["trace_id"] == first.trace_id

        # a long poll that a decision ends early: the decision lands while the wait is open (the sidecar
        # says so), and ends it long before its 60 s
        waiting = asyncio.create_task(await_decision(address, first.escalation_id, timeout=60))
        await wait_until(lambda: approvals.get(first.escalation_id), lambda e: e["agent_waiting"], "the long poll open")
        assert not waiting.done()
        started = time.monotonic()
        approved = await approvals.approve(first.escalation_id, note="ok for the board pack", approver=ALICE)
        answer = await waiting
        assert time.monotonic() - started < 10
        assert answer.escalation.state == sidecar_pb2.ESCALATION_STATE_APPROVED and not answer.timed_out
        assert answer.escalation.approver == ALICE and answer.escalation.note == "ok for the board pack"
        assert approved["state"] == "approved"

        retry = await agent.authorize("send_email", EMAIL, task_id="t-1", escalation_id=first.escalation_id)
        assert retry.outcome == "allow", retry.reasons
        assert f"approved: escalation {first.escalation_id} approved by {ALICE}" in retry.reasons
        assert retry.trace_id == first.trace_id  # the retry joins the escalated call's trace

        second_use = await agent.authorize("send_email", EMAIL, task_id="t-1", escalation_id=first.escalation_id)
        assert second_use.outcome == "deny"
        assert second_use.reasons[0].startswith(f"approval_used: the approval of escalation {first.escalation_id}")
        assert (await approvals.get(first.escalation_id))["state"] == "used"

    chain = records_of(tmp_path / "evidence", first.escalation_id)
    kinds = [(r["kind"], r["outcome"]) for r in chain]
    assert kinds == [
        ("decision", "escalate"), ("escalation", "escalate"), ("decision", "escalate"),
        ("approval", "approved"), ("decision", "allow"), ("decision", "deny"),
    ]
    escalation = chain[1]
    approval = chain[3]
    retry_record = chain[4]
    assert {r["trace_id"] for r in chain[:2] + chain[3:5]} == {first.trace_id}
    assert escalation["parent_span_id"] == chain[0]["span_id"]
    assert escalation["seq"] == chain[0]["seq"] + 1, "an escalation's record directly follows its decision's"
    assert approval["parent_span_id"] == escalation["span_id"]
    assert approval["links"] == [{"trace_id": first.trace_id, "span_id": escalation["span_id"], "type": "escalation"}]
    assert approval["approver"] == ALICE and approval["note"] == "ok for the board pack"
    assert retry_record["parent_span_id"] == escalation["span_id"] and retry_record["approver"] == ALICE
    assert "s3cret-token" not in (tmp_path / "evidence").joinpath("evidence-000001.jsonl").read_text()
    await sidecar.stop(grace=0)
    assert verify_dir(tmp_path / "evidence").ok


async def test_human_denial_is_final_and_recorded(config, running_sidecar, tmp_path):
    sidecar = await running_sidecar(config())
    async with AsyncClient(sidecar.addresses[0]) as agent, ApprovalsClient(sidecar.addresses[0]) as approvals:
        escalated = await agent.authorize("delete_repo", {"repo": "acme/billing"})
        denied = await approvals.deny(escalated.escalation_id, note="not during the freeze", approver=BOB)
        assert denied["state"] == "denied" and denied["approver"] == BOB
        answer = await await_decision(sidecar.addresses[0], escalated.escalation_id, timeout=5)
        assert answer.escalation.state == sidecar_pb2.ESCALATION_STATE_DENIED and not answer.timed_out
        retry = await agent.authorize("delete_repo", {"repo": "acme/billing"}, escalation_id=escalated.escalation_id)
        assert retry.outcome == "deny"
        assert retry.reasons == (
            f"escalation_denied: escalation {escalated.escalation_id} was denied by {BOB} at {denied['decided_at']}: "
            "not during the freeze",
        )
        late = await refused(approvals.approve(escalated.escalation_id, approver=ALICE))
        assert late.status == "FAILED_PRECONDITION" and late.code == "already_decided"
        assert (await approvals.get(escalated.escalation_id))["approver"] == BOB  # nothing changed
    kinds = [(r["kind"], r["outcome"]) for r in records_of(tmp_path / "evidence", escalated.escalation_id)]
    assert ("human_denial", "denied") in kinds and ("approval", "refused") in kinds


async def test_bad_approvals_are_refused_recorded_and_change_nothing(config, running_sidecar, tmp_path):
    sidecar = await running_sidecar(config())
    async with AsyncClient(sidecar.addresses[0]) as agent, ApprovalsClient(sidecar.addresses[0]) as approvals:
        escalated = await agent.authorize("send_email", EMAIL)
        eid = escalated.escalation_id
        cases = {
            "unknown": (approvals.approve("esc-" + "0" * 32, approver=ALICE), "NOT_FOUND", "escalation_unknown"),
            "not an id": (approvals.approve("../../etc/passwd", approver=ALICE), "NOT_FOUND", "escalation_unknown"),
            "own call": (approvals.approve(eid), "PERMISSION_DENIED", "self_approval"),  # dev: the agent itself
            "own call named": (approvals.deny(eid, approver=AGENT), "PERMISSION_DENIED", "self_approval"),
            "bad approver": (approvals.approve(eid, approver="alice"), "INVALID_ARGUMENT", "invalid_approver"),
            # one identity only: a proxy joins a repeated header with "," (the client's value, then its own)
            "a list": (approvals.approve(eid, approver="email:eve@evil.org,alice@example.org"), "INVALID_ARGUMENT",
                       "invalid_approver"),
            # the agent's own SPIFFE ID spelled another way is not another approver
            "own call in capitals": (approvals.deny(eid, approver="SPIFFE://dev.local/agent"), "INVALID_ARGUMENT",
                                     "invalid_approver"),
            "own call look-alike": (approvals.approve(eid, approver="spiffe://dev.local/\u0430gent"),
                                    "INVALID_ARGUMENT", "invalid_approver"),
            "control chars in note": (approvals.approve(eid, approver=ALICE, note="ok\x1b[2J"), "INVALID_ARGUMENT",
                                      "invalid_note"),
            "huge note": (approvals.approve(eid, approver=ALICE, note="x" * 5000), "INVALID_ARGUMENT", "invalid_note"),
        }
        for name, (call, status, code) in cases.items():
            error = await refused(call)
            assert (error.status, error.code) == (status, code), (name, error)
        assert (await approvals.get(eid))["state"] == "pending"
        assert (await approvals.approve(eid, approver=ALICE))["state"] == "approved"
        for again in (approvals.approve(eid, approver=BOB), approvals.deny(eid, approver=BOB)):
            error = await refused(again)
            assert error.code == "already_decided" and ALICE in error.message
        assert (await agent.authorize("send_email", EMAIL, escalation_id=eid)).outcome == "allow"
        error = await refused(approvals.approve(eid, approver=BOB))
        assert error.code == "approval_used"
    refusals = [r for r in records(tmp_path / "evidence") if r.get("outcome") == "refused"]
    codes = sorted(r["reasons"][0].split(":")[0] for r in refusals)
    assert codes == sorted(["escalation_unknown", "escalation_unknown", "self_approval", "self_approval",
                            "invalid_approver", "invalid_approver", "invalid_approver", "invalid_approver",
                            "invalid_note", "invalid_note", "already_decided",
                            "already_decided", "approval_used"])
    assert {r["kind"] for r in refusals} == {"approval", "human_denial"}


async def test_an_approval_holds_only_for_the_exact_call(config, running_sidecar, tmp_path):
    cfg = config()
    sidecar = await running_sidecar(cfg)
    address = sidecar.addresses[0]
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        one = await agent.authorize("send_email", EMAIL, task_id="t-1")
        other = await agent.authorize("delete_repo", {"repo": "acme/x"}, task_id="t-1")
        await approvals.approve(one.escalation_id, approver=ALICE)
        mismatches = {
            "different arguments": ("send_email", {**EMAIL, "to": "everyone@example.com"}, "t-1"),
            "another tool": ("delete_repo", {"repo": "acme/x"}, "t-1"),
            "another task": ("send_email", EMAIL, "t-2"),
        }
        for what, (tool, arguments, task) in mismatches.items():
            result = await agent.authorize(tool, arguments, task_id=task, escalation_id=one.escalation_id)
            assert result.outcome == "deny", what
            assert result.reasons[0].startswith(f"escalation_mismatch: escalation {one.escalation_id} was made for "
                                                "another call"), what
            assert what.split()[-1] in result.reasons[0] or what in result.reasons[0], (what, result.reasons)
        # another call's escalation id: the delete_repo call carrying send_email's approval
        carried = await agent.authorize("delete_repo", {"repo": "acme/x"}, task_id="t-1",
                                        escalation_id=one.escalation_id)
        assert carried.outcome == "deny" and "another tool" in carried.reasons[0]
        unknown = await agent.authorize("send_email", EMAIL, task_id="t-1", escalation_id="esc-" + "9" * 32)
        assert unknown.outcome == "deny" and unknown.reasons[0].startswith("escalation_unknown:")
        assert (await approvals.get(one.escalation_id))["state"] == "approved"  # nothing was used up
        assert (await approvals.get(other.escalation_id))["state"] == "pending"

    # another subject: a second sidecar (another dev identity) sharing the same store
    stranger = await running_sidecar(config(**{"identity.dev_spiffe_id": "spiffe://dev.local/other-agent",
                                               "evidence.dir": str(tmp_path / "evidence-2")}))
    async with AsyncClient(stranger.addresses[0]) as intruder:
        stolen = await intruder.authorize("send_email", EMAIL, task_id="t-1", escalation_id=one.escalation_id)
        assert stolen.outcome == "deny"
        assert "another subject (spiffe://dev.local/other-agent)" in stolen.reasons[0]
        assert "spiffe://dev.local/agent" not in stolen.reasons[0]  # whose it is stays untold
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await await_decision(stranger.addresses[0], one.escalation_id)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with AsyncClient(address) as agent:
        assert (await agent.authorize("send_email", EMAIL, task_id="t-1",
                                      escalation_id=one.escalation_id)).outcome == "allow"
    mismatch_records = [r for r in records(tmp_path / "evidence")
                        if r["kind"] == "decision" and r["reasons"][0].startswith("escalation_mismatch")]
    assert len(mismatch_records) == 4 and all(r["escalation_id"] == one.escalation_id for r in mismatch_records)


async def test_two_approvers_racing_exactly_one_wins(config, running_sidecar):
    sidecar = await running_sidecar(config())
    address = sidecar.addresses[0]
    async with AsyncClient(address) as agent:
        escalated = await agent.authorize("send_email", EMAIL)
    clients = [ApprovalsClient(address) for _ in range(6)]
    try:
        calls = [
            (c.approve if i % 2 == 0 else c.deny)(escalated.escalation_id, approver=f"email:approver{i}@example.org")
            for i, c in enumerate(clients)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        for c in clients:
            await c.aclose()
    winners = [r for r in results if isinstance(r, dict)]
    losers = [r for r in results if isinstance(r, ApprovalsError)]
    assert len(winners) == 1 and len(losers) == 5
    assert all(e.code == "already_decided" for e in losers)
    async with ApprovalsClient(address) as approvals:
        final = await approvals.get(escalated.escalation_id)
    assert (final["state"], final["approver"]) == (winners[0]["state"], winners[0]["approver"])


async def test_repeats_racing_through_two_sidecars_run_the_approved_call_exactly_once(config, running_sidecar,
                                                                                     tmp_path):
    """An approval is used by one repeat: eight repeats of the approved call sent at once, half through a
    second sidecar sharing the store, give one allow; the rest are denied approval_used and recorded."""
    first = await running_sidecar(config())
    second = await running_sidecar(config(**{"evidence.dir": str(tmp_path / "evidence-2")}))
    async with AsyncClient(first.addresses[0]) as agent, ApprovalsClient(first.addresses[0]) as approvals:
        escalated = await agent.authorize("send_email", EMAIL, task_id="t-race")
        await approvals.approve(escalated.escalation_id, approver=ALICE)
    agents = [AsyncClient(s.addresses[0]) for s in (first, second) for _ in range(4)]
    try:
        results = await asyncio.gather(*(
            a.authorize("send_email", EMAIL, task_id="t-race", escalation_id=escalated.escalation_id)
            for a in agents
        ))
    finally:
        for a in agents:
            await a.aclose()
    outcomes = sorted(r.outcome for r in results)
    assert outcomes == ["allow"] + ["deny"] * 7, [r.reasons for r in results]
    allowed = next(r for r in results if r.outcome == "allow")
    for denied in (r for r in results if r.outcome == "deny"):
        assert denied.reasons[0].startswith("approval_used: "), denied.reasons
    async with ApprovalsClient(first.addresses[0]) as approvals:
        used = await approvals.get(escalated.escalation_id)
    assert used["state"] == "used"
    log = records(tmp_path / "evidence") + records(tmp_path / "evidence-2")
    uses = [r for r in log if r["kind"] == "decision" and r["outcome"] == "allow"
            and r.get("escalation_id") == escalated.escalation_id]
    assert [r["decision_id"] for r in uses] == [allowed.decision_id] and uses[0]["approver"] == ALICE


async def test_expiry_of_pending_escalations_and_unused_approvals(config, running_sidecar, tmp_path):
    # The TTL leaves a loaded machine time to approve `fresh` below before it lapses too (approving
    # within 0.5 s was a race); the use window is the one waited out.
    sidecar = await running_sidecar(config(**{"escalation.ttl_seconds": 3, "escalation.use_window_seconds": 0.5}))
    address = sidecar.addresses[0]
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        lapsing = await agent.authorize("send_email", EMAIL)
        answer = await await_decision(address, lapsing.escalation_id, timeout=30)  # ends when it expires
        assert answer.escalation.state == sidecar_pb2.ESCALATION_STATE_EXPIRED and not answer.timed_out
        error = await refused(approvals.approve(lapsing.escalation_id, approver=ALICE))
        assert error.code == "escalation_expired"
        late = await agent.authorize("send_email", EMAIL, escalation_id=lapsing.escalation_id)
        assert late.outcome == "deny" and late.reasons[0].startswith("escalation_expired:")
        fresh = await agent.authorize("send_email", EMAIL)  # asking again opens a new escalation
        assert fresh.outcome == "escalate" and fresh.escalation_id != lapsing.escalation_id

        await approvals.approve(fresh.escalation_id, approver=ALICE)
        deadline = time.monotonic() + 60  # the use window passes; the sweeper expires the approval
        while (await approvals.get(fresh.escalation_id))["state"] != "expired" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert (await approvals.get(fresh.escalation_id))["state"] == "expired"
        unused = await agent.authorize("send_email", EMAIL, escalation_id=fresh.escalation_id)
        assert unused.outcome == "deny" and unused.reasons[0].startswith("approval_unused:")
    expiries = [r for r in records(tmp_path / "evidence") if r["kind"] == "expiry"]
    assert sorted(r["escalation_id"] for r in expiries) == sorted([lapsing.escalation_id, fresh.escalation_id])
    assert all(r["outcome"] == "expired" and r["trace_id"] for r in expiries)


async def test_await_decision_times_out_and_caps_the_wait(config, running_sidecar):
    sidecar = await running_sidecar(config(**{"escalation.await_max_seconds": 0.5}))
    async with AsyncClient(sidecar.addresses[0]) as agent:
        escalated = await agent.authorize("send_email", EMAIL)
        started = time.monotonic()
        answer = await await_decision(sidecar.addresses[0], escalated.escalation_id, timeout=30)
        assert answer.timed_out and answer.escalation.state == sidecar_pb2.ESCALATION_STATE_PENDING
        assert 0.4 < time.monotonic() - started < 10  # capped at 0.5 s, not the 30 asked (10: a loaded machine)
        for bad, code in (("esc-" + "1" * 32, grpc.StatusCode.NOT_FOUND), ("nope", grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await await_decision(sidecar.addresses[0], bad)
            assert info.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await await_decision(sidecar.addresses[0], escalated.escalation_id, timeout=float("nan"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_policy_may_require_more_of_the_approver(config, running_sidecar):
    sidecar = await running_sidecar(config())
    async with AsyncClient(sidecar.addresses[0]) as agent, ApprovalsClient(sidecar.addresses[0]) as approvals:
        wire = {"amount": 1000, "to": "ACME"}
        first = await agent.authorize("wire_money", wire)
        await approvals.approve(first.escalation_id, approver=ALICE)  # not in data.finance_approvers
        insufficient = await agent.authorize("wire_money", wire, escalation_id=first.escalation_id)
        assert insufficient.outcome == "deny"
        assert insufficient.reasons[0].startswith("approval_insufficient:")
        assert (await approvals.get(first.escalation_id))["state"] == "approved"  # not used up
        second = await agent.authorize("wire_money", wire)
        assert second.escalation_id == first.escalation_id  # still the active one for this call
        # a fresh call (other arguments) approved by finance goes through
        third = await agent.authorize("wire_money", {**wire, "memo": "Q3"})
        await approvals.approve(third.escalation_id, approver=CFO)
        ok = await agent.authorize("wire_money", {**wire, "memo": "Q3"}, escalation_id=third.escalation_id)
        assert ok.outcome == "allow"


async def test_deny_rules_beat_an_approval(config, running_sidecar, tmp_path):
    # policy files change under the sidecar: rm_rf escalates... then is denied outright
    sidecar = await running_sidecar(config())
    async with AsyncClient(sidecar.addresses[0]) as agent:
        denied = await agent.authorize("rm_rf", {"path": "/"})
        assert denied.outcome == "deny" and denied.escalation_id == ""
    assert not [r for r in records(tmp_path / "evidence") if r["kind"] == "escalation"]


async def test_pending_escalations_survive_a_restart(config, running_sidecar, tmp_path):
    cfg = config()
    first = await running_sidecar(cfg)
    async with AsyncClient(first.addresses[0]) as agent:
        escalated = await agent.authorize("send_email", EMAIL)
    await first.stop(grace=0)

    second = await running_sidecar(cfg)
    async with AsyncClient(second.addresses[0]) as agent, ApprovalsClient(second.addresses[0]) as approvals:
        assert [e["escalation_id"] for e in await approvals.list()] == [escalated.escalation_id]
        again = await agent.authorize("send_email", EMAIL)
        assert again.escalation_id == escalated.escalation_id
        await approvals.approve(escalated.escalation_id, approver=ALICE)
        assert (await agent.authorize("send_email", EMAIL, escalation_id=escalated.escalation_id)).outcome == "allow"


async def test_watch_streams_current_and_new_changes(config, running_sidecar):
    sidecar = await running_sidecar(config())
    address = sidecar.addresses[0]
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        before = await agent.authorize("send_email", EMAIL)
        seen: list[tuple[str, str]] = []
        subscribed = asyncio.Event()

        async def watch() -> None:
            async for change in approvals.watch():
                seen.append((change["escalation_id"], change["state"]))
                subscribed.set()  # the current state came first: what follows is new
                if len(seen) == 4:
                    return

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(subscribed.wait(), 60)  # not a fixed sleep: a loaded machine subscribes late
        after = await agent.authorize("delete_repo", {"repo": "acme/x"})
        assert (before.outcome, after.outcome) == ("escalate", "escalate"), (before.reasons, after.reasons)
        await approvals.approve(before.escalation_id, approver=ALICE)
        await approvals.deny(after.escalation_id, approver=ALICE)
        await asyncio.wait_for(watcher, 60)  # ends as soon as the four changes arrived
    assert seen == [
        (before.escalation_id, "pending"),
        (after.escalation_id, "pending"),
        (before.escalation_id, "approved"),
        (after.escalation_id, "denied"),
    ]


async def test_the_client_guard_waits_for_a_human_then_repeats_the_call(config, running_sidecar):
    sidecar = await running_sidecar(config())
    address = sidecar.addresses[0]
    ran: list[str] = []

    async def approve_when_asked(approve: bool, tool: str = "send_email") -> None:
        async with ApprovalsClient(address) as approvals:
            pending = await until_pending(approvals, tool=tool)  # a 60 s deadline, not 100 polls
            decide = approvals.approve if approve else approvals.deny
            await decide(pending[0]["escalation_id"], approver=ALICE, note="checked")

    def agent_side(timeout: float, body: str) -> None:
        with Client(address, escalation_timeout=timeout) as client:

            @client.guard()
            def send_email(to: str, body: str) -> str:
                ran.append(body)
                return "sent"

            if body == "approved":
                assert send_email("cfo@example.com", body) == "sent"
            elif body == "denied":
                with pytest.raises(AuthorizationDenied) as info:
                    send_email("cfo@example.com", body)
                assert info.value.reasons[0].startswith("escalation_denied:") and "checked" in info.value.reasons[0]
            else:
                with pytest.raises(EscalationRequired) as info:
                    send_email("cfo@example.com", body)
                assert info.value.escalation_id

    # the guard waits up to 120 s for the helper's decision, which ends the wait at once
    helper = asyncio.create_task(approve_when_asked(True))
    await asyncio.to_thread(agent_side, 120, "approved")
    await helper
    helper = asyncio.create_task(approve_when_asked(False))
    await asyncio.to_thread(agent_side, 120, "denied")
    await helper
    await asyncio.to_thread(agent_side, 0.3, "nobody decides")
    await asyncio.to_thread(agent_side, 0, "waiting disabled")
    assert ran == ["approved"]

    # and the asyncio client
    async with AsyncClient(address, escalation_timeout=120) as client:

        @client.guard(tool="delete_repo")
        async def delete(repo: str) -> str:
            ran.append(repo)
            return "deleted"

        helper = asyncio.create_task(approve_when_asked(True, tool="delete_repo"))
        assert await delete("acme/old") == "deleted"
        await helper
    assert ran == ["approved", "acme/old"]


async def test_escalations_without_a_working_store_are_denied_not_lost(config, running_sidecar):
    sidecar = await running_sidecar(config())
    async with AsyncClient(sidecar.addresses[0]) as agent:
        await sidecar.escalations.store.aclose()  # the store goes away under the sidecar
        result = await agent.authorize("send_email", EMAIL)
        assert result.outcome == "deny" and result.escalation_id == ""
        assert result.reasons[0].startswith("escalation_unavailable:")
        allowed = await agent.authorize("search_docs", {"query": "x"})
        assert allowed.outcome == "allow"  # decisions that need no human go on
        serving, detail = sidecar.health.snapshot()
        assert not serving and "escalation: NOT OK" in detail
        await sidecar.escalations.store.open()


async def test_an_unparseable_approval_is_refused_and_recorded(config, running_sidecar, tmp_path):
    sidecar = await running_sidecar(config())
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        approve = channel.unary_unary("/sidecar.v1.Approvals/Approve")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await approve(b"\x0a\x02\xff\xfe", timeout=5)  # escalation_id: two bytes that are not UTF-8
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("malformed_request:")
    (record,) = [r for r in records(tmp_path / "evidence") if r["kind"] == "approval"]
    assert record["outcome"] == "refused" and record["reasons"][0].startswith("malformed_request:")


async def wait_until(read, predicate, what: str, timeout: float = 60.0):
    """Poll `read()` until `predicate(value)`, up to a deadline generous for a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never in {timeout:.0f} s: {what}")
        await asyncio.sleep(0.05)


async def test_approvers_see_what_they_decide(config, running_sidecar, tmp_path):
    """Intent, signals, the catalog entry, the full arguments for who may decide, the agent's presence."""
    sidecar = await running_sidecar(config(**{"escalation.approvers": [ALICE, CFO]}))
    address = sidecar.addresses[0]
    signals = {"risk_score": 0.82, "model": "claude-test", "nested": {"n": 1}}
    intent = "Send the Q3 numbers to the CFO"
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        first = await agent.authorize("send_email", EMAIL, task_id="t-1", intent=intent, signals=signals)
        wire = await agent.authorize("wire_money", {"amount": 12.5, "to": "acme"})

        as_alice = await approvals.get(first.escalation_id, approver=ALICE)
        assert as_alice["arguments"] == EMAIL and as_alice["arguments_withheld"] == ""  # the secret too
        assert as_alice["arguments_preview"]["api_token"] == "[REDACTED]"
        assert as_alice["intent"] == intent and as_alice["signals"] == signals
        assert as_alice["tool_catalog"] == {
            "risk": "high", "reversible": False, "owner": "communications", "server": "mail",
            "description": "Send an email on behalf of the organisation."}
        assert as_alice["subject_source"] == "dev" and as_alice["agent_waiting"] is False
        assert as_alice["agent_seen_at"] == as_alice["created_at"]
        assert (await approvals.get(wire.escalation_id, approver=ALICE))["tool_catalog"] is None  # not in catalog

        # who may not decide it reads the redacted preview, and why
        for reader, code in ((AGENT, "self_approval"), (BOB, "not_an_approver"), ("", "self_approval")):
            seen = await approvals.get(first.escalation_id, approver=reader)
            assert seen["arguments"] is None and seen["arguments_withheld"].startswith(code + ": ")
            assert seen["intent"] == intent and seen["arguments_preview"]["api_token"] == "[REDACTED]"
        listed = {e["escalation_id"]: e for e in await approvals.list(state="pending", approver=CFO)}
        assert [e for e in listed] == [wire.escalation_id, first.escalation_id]  # newest first
        assert listed[first.escalation_id]["arguments"] == EMAIL
        assert listed[wire.escalation_id]["arguments"] == {"amount": 12.5, "to": "acme"}
        assert all(e["arguments"] is None for e in await approvals.list(approver=BOB))

        # a repeat of the call is the agent asking again
        await agent.authorize("send_email", EMAIL, task_id="t-1", intent=intent, signals=signals)
        repeated = await approvals.get(first.escalation_id)
        assert repeated["agent_seen_at"] > as_alice["agent_seen_at"]

        # an open AwaitDecision shows the agent waiting; one that timed out, or was cancelled, does not
        answer = await await_decision(address, first.escalation_id, timeout=0.2)
        assert answer.timed_out and not answer.escalation.HasField("arguments")  # never to the agent
        gave_up = await approvals.get(first.escalation_id)
        assert gave_up["agent_waiting"] is False and gave_up["agent_seen_at"] > repeated["agent_seen_at"]
        async with grpc.aio.insecure_channel(address) as channel:
            call = sidecar_pb2_grpc.ToolGateStub(channel).AwaitDecision(
                sidecar_pb2.AwaitDecisionRequest(escalation_id=first.escalation_id, timeout_seconds=30), timeout=35)
            await wait_until(lambda: approvals.get(first.escalation_id), lambda e: e["agent_waiting"], "waiting")
            call.cancel()
            await wait_until(lambda: approvals.get(first.escalation_id), lambda e: not e["agent_waiting"],
                             "not waiting after the agent hung up")

        waiting = asyncio.create_task(await_decision(address, first.escalation_id, timeout=30))
        await wait_until(lambda: approvals.get(first.escalation_id), lambda e: e["agent_waiting"], "waiting again")
        decided = await approvals.approve(first.escalation_id, approver=ALICE)
        assert decided["arguments"] is None and decided["state"] == "approved"
        assert (await waiting).escalation.state == sidecar_pb2.ESCALATION_STATE_APPROVED
        after = await approvals.get(first.escalation_id, approver=CFO)
        assert after["arguments"] is None and after["arguments_withheld"].startswith("arguments_not_kept: ")
        assert after["agent_waiting"] is False and after["intent"] == intent

    log = "".join(p.read_text() for p in (tmp_path / "evidence").glob("evidence-*.jsonl"))
    assert "s3cret-token" not in log


async def test_no_unredacted_arguments_without_previews(config, running_sidecar):
    sidecar = await running_sidecar(config(**{"escalation.preview_arguments": False}))
    address = sidecar.addresses[0]
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        first = await agent.authorize("send_email", EMAIL, intent="x")
        seen = await approvals.get(first.escalation_id, approver=ALICE)
    assert seen["arguments"] is None and seen["arguments_preview"] is None
    assert seen["arguments_withheld"].startswith("arguments_not_kept: escalation.preview_arguments is off")


async def test_escalations_too_large_to_list_together_are_listed_in_summary_and_read_alone(tmp_path, running_sidecar):
    """An agent's big escalations cannot blind the approvers: a List answer stays under the 4 MiB a gRPC
    client receives by default, so the others still show (they did not: six calls of 800 KB each made
    List fail for everyone, console and CLI). What does not fit comes as a summary saying why, without
    arguments, preview or signals, never as an approve-able whole; Get reads any escalation whole."""
    sidecar = await running_sidecar(make_config(tmp_path, **BIG_CALLS))
    address = sidecar.addresses[0]
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        small = (await agent.authorize("send_email", EMAIL, intent="small")).escalation_id
        big = [(await agent.authorize("send_email", {"to": f"x{i}@example.com", "body": "y" * 800_000},
                                      signals={"big": "z" * 100_000})).escalation_id for i in range(6)]
        # Struct-heavy: each 1 costs 11 bytes as protobuf, so this one alone is past 4 MiB when read whole
        numbers = (await agent.authorize("delete_repo", {"repo": "acme/x", "ids": [1] * 382_000})).escalation_id

        listed = await approvals.list(state="pending", limit=500, approver=ALICE)
        assert [e["escalation_id"] for e in listed] == [numbers, *reversed(big), small]  # all, newest first
        summaries = [e for e in listed if e["arguments_withheld"].startswith("too_large_to_list: ")]
        whole = [e for e in listed if e not in summaries]
        assert numbers in {e["escalation_id"] for e in summaries} and len(summaries) >= 4
        assert {e["escalation_id"] for e in whole} >= {small}
        for summary in summaries:
            assert summary["arguments"] is None and summary["arguments_preview"] is None
            assert summary["signals"] is None and summary["arguments_digest"].startswith("sha256:")
            assert f"escalation {summary['escalation_id']} is " in summary["arguments_withheld"]
        assert next(e for e in listed if e["escalation_id"] == small)["arguments"] == EMAIL

        alone = await approvals.get(numbers, approver=ALICE)
        assert alone["arguments"]["ids"] == [1] * 382_000 and alone["arguments_withheld"] == ""
        assert (await approvals.get(big[0], approver=ALICE))["signals"] == {"big": "z" * 100_000}
