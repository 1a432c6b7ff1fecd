"""An escalating call whose caller goes away mid-decision still leaves its whole story.

Creating the escalation in the store is the first step a human can act on: once it is there,
approvers can list and approve it. If the agent's deadline passes while the store is slow (a
PostgreSQL failover, a busy SQLite file), the Gate's handler is cancelled after the store write
was issued; the escalation must then still get its decision record and be announced (its
`escalation` evidence record, the webhook, watchers), or be withdrawn. Found by a review: the
escalation was left pending and approvable with neither record, and the agent's repeat of the
call found it and never announced it either.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from sidecar.client import build_request
from sidecar.escalation.client import ApprovalsClient
from sidecar.evidence.verify import verify_dir
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.doubles.escalation import make_config, records

EMAIL = {"to": "cfo@example.com", "body": "numbers"}


async def until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    return predicate()


@pytest.fixture
async def sidecar(tmp_path, running_sidecar):
    config = make_config(tmp_path, **{"escalation.store_timeout_ms": 5000})
    return await running_sidecar(config), config


async def test_an_escalation_created_after_its_caller_left_is_recorded_and_announced(sidecar):
    running, config = sidecar
    # Another writer holds the store's write lock: the escalating call waits for it (busy timeout).
    blocker = sqlite3.connect(config.escalation.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        async with grpc.aio.insecure_channel(running.addresses[0]) as channel:
            stub = sidecar_pb2_grpc.ToolGateStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Authorize(build_request("send_email", EMAIL), timeout=0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        blocker.execute("ROLLBACK")  # the store write goes through now, after the caller left
        blocker.close()

    evidence = Path(config.evidence.dir)
    decision = await until(lambda: next((r for r in records(evidence) if r["kind"] == "decision"), None))
    assert decision is not None, "the escalating call left no decision record"
    assert decision["outcome"] == "escalate" and decision["escalation_id"]
    escalation_id = decision["escalation_id"]
    announced = await until(lambda: [r for r in records(evidence)
                                     if r["kind"] == "escalation" and r.get("escalation_id") == escalation_id])
    assert announced, "the escalation is approvable but was never announced (no escalation record)"

    async with ApprovalsClient(running.addresses[0]) as approvals:
        listed = await approvals.list(state="pending")
    assert [e["escalation_id"] for e in listed] == [escalation_id]  # the one approvers see is the recorded one
    assert verify_dir(evidence).ok


async def test_a_call_cancelled_before_policy_answers_leaves_nothing_approvable(sidecar):
    """The other side of the same rule: a call cancelled before it escalated leaves no escalation at all,
    or one that is recorded; never an approvable escalation without records."""
    running, config = sidecar
    async with grpc.aio.insecure_channel(running.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        for timeout in (0.001, 0.003, 0.01, 0.03):
            try:
                await stub.Authorize(build_request("send_email", {**EMAIL, "body": f"t={timeout}"}), timeout=timeout)
            except grpc.aio.AioRpcError:
                pass
        ok = await stub.Authorize(build_request("search_docs", {"query": "x"}))
        assert ok.outcome in (sidecar_pb2.OUTCOME_ALLOW, sidecar_pb2.OUTCOME_DENY)  # still serving
    evidence = Path(config.evidence.dir)
    async with ApprovalsClient(running.addresses[0]) as approvals:
        async def settled():
            pending = await approvals.list(state="pending")
            announced = {r.get("escalation_id") for r in records(evidence) if r["kind"] == "escalation"}
            return pending, announced

        deadline = time.monotonic() + 10
        pending, announced = await settled()
        while time.monotonic() < deadline and not {e["escalation_id"] for e in pending} <= announced:
            await asyncio.sleep(0.05)
            pending, announced = await settled()
    assert {e["escalation_id"] for e in pending} <= announced


@pytest.mark.parametrize("verb, kind, state", [("approve", "approval", "approved"), ("deny", "human_denial", "denied")])
async def test_a_decision_made_after_its_approver_left_is_recorded(sidecar, verb, kind, state):
    """The same for a person's decision: once the store has it, the agent's repeated call acts on it,
    so its approval (or human_denial) record must be written though the approver's client gave up."""
    running, config = sidecar
    async with grpc.aio.insecure_channel(running.addresses[0]) as channel:
        escalated = await sidecar_pb2_grpc.ToolGateStub(channel).Authorize(build_request("send_email", EMAIL))
    assert escalated.outcome == sidecar_pb2.OUTCOME_ESCALATE
    blocker = sqlite3.connect(config.escalation.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        async with ApprovalsClient(running.addresses[0], timeout=0.5) as approvals:
            with pytest.raises(Exception):  # DEADLINE_EXCEEDED
                await getattr(approvals, verb)(escalated.escalation_id, note="ok", approver="email:alice@example.org")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    async with ApprovalsClient(running.addresses[0]) as approvals:
        async def decided():
            return (await approvals.get(escalated.escalation_id))["state"] != "pending"

        deadline = time.monotonic() + 10
        while not await decided() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        current = await approvals.get(escalated.escalation_id)
    assert current["state"] == state  # the store took the decision after the approver left ...
    evidence = Path(config.evidence.dir)
    written = await until(lambda: [r for r in records(evidence)
                                   if r["kind"] == kind and r.get("escalation_id") == escalated.escalation_id
                                   and r.get("outcome") == state])
    assert written, f"the escalation is {state} but has no {kind} record"  # ... and it is recorded
    assert verify_dir(evidence).ok
