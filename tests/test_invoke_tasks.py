"""Task lifetimes: EndTask(task_id) and the idle timeout end a task; every later call under it is
denied (task_ended) and recorded, through Authorize, Invoke and the MCP gateway alike. Each ending is
one `task_end` evidence record, chained before the decisions it explains (docs/mcp.md#tasks). EndTask
takes exactly the task ids a call may use, so no task can be used yet never ended. What survives the loss
of the task store is in tests/test_task_durability.py."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from mcp.client.client import Client

from sidecar.calls import ToolCall, check_call, usable_id
from sidecar.client import build_request
from sidecar.display import FLAG
from sidecar.evidence import EvidenceError, Receipt, TraceContext
from sidecar.evidence.log import EvidenceLog
from sidecar.evidence.records import dev_key_path, record_hash
from sidecar.evidence.show import Filter, show
from sidecar.evidence.verify import verify_dir
from sidecar.identity import CallerIdentity, Subject
from sidecar.task_store import TaskStore
from sidecar.tasks import TaskEndUnrecorded, TaskOwnerMismatch, TaskRegistry
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import SIMPLE_POLICY, write_policy
from tests.doubles.escalation import records
from tests.infra.jaeger import Jaeger, clean_otel_env, wait_until_async  # noqa: F401 (fixture)
from tests.mcp_upstreams import Seen, docs_server, serve_http

ALICE = CallerIdentity(Subject("spiffe://example.org/alice", "jwt_svid"))
BOB = CallerIdentity(Subject("spiffe://example.org/bob", "jwt_svid"))


def search(task_id: str) -> sidecar_pb2.AuthorizeRequest:
    return build_request("search_docs", {"query": "rotation"}, task_id=task_id)


def call() -> TraceContext:
    return TraceContext.new()


@pytest.fixture
async def store(tmp_path):
    """A real task store (SQLite) in the test's directory."""
    async with TaskStore(tmp_path / "tasks.db") as opened:
        yield opened


async def test_idle_tasks_end_and_stay_ended(store):
    now = [0.0]
    tasks = TaskRegistry(store=store, idle_seconds=60, max_tracked=100, clock=lambda: now[0], wall_clock=lambda: 0.0)
    assert await tasks.check("t", ALICE, call()) is None
    now[0] = 59
    assert await tasks.check("t", ALICE, call()) is None  # each call restarts the idle clock
    now[0] = 119
    assert await tasks.check("t", ALICE, call()) is None
    now[0] = 180
    refusal = await tasks.check("t", ALICE, call())
    assert refusal.startswith("task_ended: task 't' ended after 60 s without calls")
    now[0] = 181
    assert (await tasks.check("t", ALICE, call())) == refusal  # ended for good
    ending = await tasks.end("t", ALICE)
    assert ending.already_ended and ending.ended_at == "1970-01-01T00:00:00.000000Z"


async def test_only_the_tasks_subject_may_end_it(store):
    tasks = TaskRegistry(store=store, idle_seconds=0, max_tracked=100)
    assert await tasks.check("t", ALICE, call()) is None
    with pytest.raises(TaskOwnerMismatch):
        await tasks.end("t", BOB)
    assert await tasks.check("t", ALICE, call()) is None  # Bob's attempt changed nothing
    ending = await tasks.end("t", ALICE)
    assert not ending.already_ended and ending.ended_at.endswith("Z") and ending.receipt is None
    again = await tasks.end("t", ALICE)
    assert again.already_ended and again.ended_at == ending.ended_at and again.trace_id == ending.trace_id
    with pytest.raises(TaskOwnerMismatch):
        await tasks.end("t", BOB)
    assert (await tasks.check("t", ALICE, call())).startswith("task_ended: task 't' was ended by EndTask at")
    assert await tasks.check("other", ALICE, call()) is None


async def test_tasks_that_leave_memory_are_read_back_from_the_store_as_they_were(store):
    """Past usage.max_tracked the least recently used tasks leave memory, not the store: an agent ending fresh
    tasks (EndTask or the idle timeout) cannot make the sidecar forget one it must keep refusing, nor, opening
    fresh tasks, one whose owner it must keep; and a task that left memory comes back as it was."""
    now = [0.0]
    tasks = TaskRegistry(store=store, idle_seconds=60, max_tracked=3, clock=lambda: now[0], wall_clock=lambda: now[0])
    assert await tasks.check("ended-by-owner", ALICE, call()) is None
    ended = await tasks.end("ended-by-owner", ALICE)
    assert await tasks.check("went-idle", ALICE, call()) is None
    now[0] = 100
    went_idle = await tasks.check("went-idle", ALICE, call())
    assert went_idle.startswith("task_ended: task 'went-idle' ended after 60 s without calls")
    assert await tasks.check("alices-open-task", ALICE, call()) is None
    for i in range(10):  # EndTask of fresh ids, and calls under new tasks
        await tasks.end(f"flood-{i}", BOB)
        assert await tasks.check(f"new-{i}", BOB, call()) is None
    for who in (ALICE, BOB):
        assert await tasks.check("ended-by-owner", who, call()) == (
            f"task_ended: task 'ended-by-owner' was ended by EndTask at {ended.ended_at}; start a new task")
        assert await tasks.check("went-idle", who, call()) == went_idle
        assert (await tasks.check("flood-0", who, call())).startswith("task_ended: task 'flood-0' was ended by EndTask")
    again = await tasks.end("ended-by-owner", ALICE)  # the same ending, no second record
    assert again.already_ended and (again.ended_at, again.trace_id) == (ended.ended_at, ended.trace_id)
    with pytest.raises(TaskOwnerMismatch):
        await tasks.end("ended-by-owner", BOB)
    assert (await tasks.check("alices-open-task", BOB, call())).startswith("not_task_owner: task 'alices-open-task'")
    assert await tasks.check("alices-open-task", ALICE, call()) is None
    assert (await tasks.check("new-0", ALICE, call())).startswith("not_task_owner: ")
    assert await tasks.check("new-0", BOB, call()) is None
    now[0] = 161  # idle clocks come back with the tasks: new-1 last saw a call at 100
    assert (await tasks.check("new-1", BOB, call())).startswith("task_ended: task 'new-1' ended after 60 s")
    assert [await tasks.check(f"brand-new-{i}", ALICE, call()) for i in range(50)] == [None] * 50


async def restarted(path, **kwargs) -> tuple[TaskStore, TaskRegistry]:
    store = TaskStore(path)
    await store.open()
    return store, TaskRegistry(store=store, **kwargs)


async def test_a_restart_keeps_endings_owners_and_idle_clocks(tmp_path):
    """A restart (a new store and registry on the same file, as the next sidecar process opens it) forgets
    no task: an ended one stays ended with its first reason and record, an open one stays its owner's, and
    its idle clock goes on from the last call stored before the restart."""
    log = EvidenceLog.open(tmp_path / "ev", instance_id="s", checkpoint_every=0, checkpoint_seconds=0)
    wall = [1_000.0]
    try:
        store, tasks = await restarted(tmp_path / "tasks.db", idle_seconds=60, max_tracked=100,
                                       sink=SwitchableSink(log), instance_id="s", wall_clock=lambda: wall[0])
        async with tasks:
            assert await tasks.check("ended", ALICE, call()) is None
            ending = await tasks.end("ended", ALICE)
            assert await tasks.check("open", ALICE, call()) is None
            assert await tasks.check("busy", BOB, call()) is None
            wall[0] = 1_050.0
            assert await tasks.check("busy", BOB, call()) is None  # its last call, written at the flush on exit
        await store.aclose()

        wall[0] = 1_080.0  # the next process, 30 s later
        store, tasks = await restarted(tmp_path / "tasks.db", idle_seconds=60, max_tracked=100,
                                       sink=SwitchableSink(log), instance_id="s", wall_clock=lambda: wall[0])
        async with tasks:
            for who in (ALICE, BOB):
                assert await tasks.check("ended", who, call()) == (
                    f"task_ended: task 'ended' was ended by EndTask at {ending.ended_at}; start a new task")
            again = await tasks.end("ended", ALICE)
            assert again.already_ended and again.receipt == ending.receipt and again.ended_at == ending.ended_at
            assert (await tasks.check("open", BOB, call())).startswith(
                "not_task_owner: task 'open' belongs to spiffe://example.org/alice")
            # "open" last saw a call at 1,000: 80 s ago, past the 60 s idle timeout across the restart
            assert (await tasks.check("open", ALICE, call())).startswith("task_ended: task 'open' ended after 60 s")
            assert await tasks.check("busy", BOB, call()) is None  # 30 s since its last call at 1,050
        await store.aclose()
    finally:
        log.close()
    task_ends = [r for r in records(tmp_path / "ev") if r["kind"] == "task_end"]
    assert [(r["task_id"], r["ended_by"]) for r in task_ends] == [("ended", "end_task"), ("open", "idle_timeout")]
    assert verify_dir(tmp_path / "ev").ok


class LockHolder:
    """Another process's write lock on the task store (a real SQLite lock, held on another connection):
    every operation of the store fails with `database is locked` until it is released."""

    def __init__(self, path):
        self._conn = sqlite3.connect(str(path), isolation_level=None)

    def hold(self) -> None:
        self._conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self._conn.execute("ROLLBACK")


async def test_a_task_store_that_fails_denies_the_call_and_ends_nothing_for_good_until_it_works(tmp_path):
    from sidecar.tasks import TaskStateUnavailable

    log = EvidenceLog.open(tmp_path / "ev", instance_id="s", checkpoint_every=0, checkpoint_seconds=0)
    store = TaskStore(tmp_path / "tasks.db", timeout_ms=50)
    await store.open()
    lock = LockHolder(tmp_path / "tasks.db")
    tasks = TaskRegistry(store=store, idle_seconds=0, max_tracked=100, sink=SwitchableSink(log), instance_id="s")
    try:
        assert await tasks.check("t", ALICE, call()) is None
        lock.hold()
        # a task the sidecar has not seen cannot be opened: denied, and nothing is remembered for it
        refusal = await tasks.check("new", ALICE, call())
        assert refusal.startswith("task_state_unavailable: the state of task 'new' cannot be read or stored (")
        assert "database is locked" in refusal
        ok, detail = store.health()
        assert not ok and "database is locked" in detail
        with pytest.raises(TaskStateUnavailable) as unread:
            await tasks.end("unseen", ALICE)
        assert unread.value.reason.startswith("task_state_unavailable: ")
        # an ending that cannot be stored holds at once, and is neither recorded nor forgotten
        with pytest.raises(TaskEndUnrecorded) as info:
            await tasks.end("t", ALICE)
        assert info.value.reason.startswith("task_state_unavailable: task 't' ended at ")
        assert "could not be stored" in info.value.reason and "send EndTask again to store it" in info.value.reason
        refusal = await tasks.check("t", ALICE, call())
        assert refusal.startswith("task_state_unavailable: task 't' was ended by EndTask at ")
        lock.release()
        assert await tasks.check("new", ALICE, call()) is None
        assert store.health() == (True, f"task store sqlite {tmp_path / 'tasks.db'}")
        assert (await tasks.check("t", ALICE, call())).startswith("task_ended: task 't' was ended by EndTask")
        again = await tasks.end("t", ALICE)
        assert again.already_ended and again.receipt is not None
    finally:
        await store.aclose()
        log.close()
    # stored for real: a restart refuses it too, and the one task_end record was written once
    store, tasks = await restarted(tmp_path / "tasks.db", idle_seconds=0, max_tracked=100)
    try:
        assert (await tasks.check("t", BOB, call())).startswith("task_ended: task 't' was ended by EndTask")
    finally:
        await store.aclose()
    assert [r["task_id"] for r in records(tmp_path / "ev") if r["kind"] == "task_end"] == ["t"]


class CountingStore(TaskStore):
    """The real task store, counting the tasks it was asked to open."""

    opened = 0

    async def open_task(self, task):
        self.opened += 1
        return await super().open_task(task)


async def test_calls_under_a_new_task_at_once_make_one_owner(tmp_path):
    """Concurrent first calls under one unseen task id: the store is asked once, and the first caller owns it."""
    async with CountingStore(tmp_path / "tasks.db") as store:
        tasks = TaskRegistry(store=store, idle_seconds=0, max_tracked=100)
        refusals = await asyncio.gather(*(tasks.check("race", who, call()) for who in (ALICE, BOB, ALICE, BOB)))
    assert refusals[0] is None and refusals[2] is None
    assert refusals[1].startswith("not_task_owner: task 'race' belongs to spiffe://example.org/alice")
    assert refusals[3] == refusals[1]
    assert store.opened == 1


async def test_last_call_times_reach_the_store_while_the_sidecar_runs(tmp_path):
    """Inside `async with`, last call times are written every flush_seconds, not only at a clean stop:
    a sidecar killed later still finds them (here: read back by a second store on the same file)."""
    wall = [1_000.0]
    async with TaskStore(tmp_path / "tasks.db") as store:
        async with TaskRegistry(store=store, idle_seconds=60, max_tracked=100, wall_clock=lambda: wall[0],
                                flush_seconds=0.05) as tasks:
            assert await tasks.check("t", ALICE, call()) is None
            wall[0] = 1_030.0
            assert await tasks.check("t", ALICE, call()) is None
            async with TaskStore(tmp_path / "tasks.db") as reader:
                for _ in range(200):
                    if (await reader.get("t")).last_call_at == 1_030.0:
                        break
                    await asyncio.sleep(0.02)
                assert (await reader.get("t")).last_call_at == 1_030.0


ORCHESTRATOR = Subject("spiffe://example.org/orchestrator", "jwt_svid")
PLANNER = Subject("spiffe://example.org/planner", "jwt_svid")
RESEARCHER = Subject("spiffe://example.org/researcher", "jwt_svid")


def acting_for(caller: Subject, *chain: Subject) -> CallerIdentity:
    return CallerIdentity(caller, tuple(chain))


async def test_another_agent_can_neither_call_under_a_task_nor_keep_it_alive(store):
    now = [0.0]
    tasks = TaskRegistry(store=store, idle_seconds=60, max_tracked=100, clock=lambda: now[0], wall_clock=lambda: 0.0)
    assert await tasks.check("t", ALICE, call()) is None
    for when in (30, 59, 90):  # Bob's calls are refused, and do not restart the task's idle clock
        now[0] = when
        refusal = await tasks.check("t", BOB, call())
        assert refusal == ("not_task_owner: task 't' belongs to spiffe://example.org/alice; spiffe://example.org/bob "
                           "acts for another agent (a task's calls come from its owner or an agent it delegated to)")
    assert (await tasks.check("t", ALICE, call())).startswith("task_ended: task 't' ended after 60 s without calls")
    # another agent through a chain that does not start with the owner is refused too
    assert (await tasks.check("u", ALICE, call())) is None
    assert (await tasks.check("u", acting_for(BOB.subject, ORCHESTRATOR), call())).startswith("not_task_owner: ")
    assert (await tasks.check("u", acting_for(ALICE.subject, ORCHESTRATOR), call())).startswith("not_task_owner: ")


async def test_a_task_belongs_to_the_agent_that_started_it_and_to_the_agents_it_delegated_to(store):
    tasks = TaskRegistry(store=store, idle_seconds=0, max_tracked=100)
    # the orchestrator hands the task to the planner: the planner's first call makes it the orchestrator's
    assert await tasks.check("t", acting_for(PLANNER, ORCHESTRATOR), call()) is None
    assert await tasks.check("t", acting_for(RESEARCHER, ORCHESTRATOR), call()) is None
    assert await tasks.check("t", acting_for(RESEARCHER, ORCHESTRATOR, PLANNER), call()) is None
    assert await tasks.check("t", CallerIdentity(ORCHESTRATOR), call()) is None
    on_its_own = await tasks.check("t", CallerIdentity(PLANNER), call())  # the planner acting for itself
    assert on_its_own.startswith("not_task_owner: task 't' belongs to spiffe://example.org/orchestrator; ")
    with pytest.raises(TaskOwnerMismatch):
        await tasks.end("t", CallerIdentity(PLANNER))
    ending = await tasks.end("t", acting_for(RESEARCHER, ORCHESTRATOR))  # an agent it delegated to ends it
    assert not ending.already_ended
    assert (await tasks.check("t", CallerIdentity(ORCHESTRATOR), call())).startswith("task_ended: ")
    with pytest.raises(TaskOwnerMismatch):
        await tasks.end("t", CallerIdentity(PLANNER))
    assert (await tasks.end("t", CallerIdentity(ORCHESTRATOR))).already_ended


class SwitchableSink:
    """TEST DOUBLE: the real evidence log behind a switch that makes appends fail, then work again.

    The real log fails only when its disk does (full, I/O error), which a test cannot bring about and
    take away portably; every record that does get through is written, chained and verified for real.
    """

    def __init__(self, log: EvidenceLog):
        self.log = log
        self.failing = False
        self.attempts = 0

    async def append(self, kind: str, fields: dict) -> Receipt:
        self.attempts += 1
        if self.failing:
            raise EvidenceError("no space left on the evidence volume")
        return await self.log.append(kind, fields)


async def test_an_ending_that_cannot_be_recorded_still_ends_the_task_and_is_recorded_once_evidence_works(tmp_path, store):
    log = EvidenceLog.open(tmp_path / "ev", instance_id="s", checkpoint_every=0, checkpoint_seconds=0)
    sink = SwitchableSink(log)
    tasks = TaskRegistry(store=store, idle_seconds=0, max_tracked=100, sink=sink, instance_id="s")
    try:
        first = call()
        assert await tasks.check("t", ALICE, first) is None
        sink.failing = True
        with pytest.raises(TaskEndUnrecorded) as info:
            await tasks.end("t", ALICE)
        assert "task 't' ended at" in str(info.value) and "send EndTask again to record it" in str(info.value)
        assert info.value.reason.startswith("evidence_unavailable: task 't' ended at ")
        ended_at = info.value.ending.ended_at
        refusal = await tasks.check("t", ALICE, call())  # ended all the same, and says why it is not task_ended
        assert refusal.startswith("evidence_unavailable: task 't' was ended by EndTask at " + ended_at)
        with pytest.raises(TaskEndUnrecorded):
            await tasks.end("t", ALICE)
        sink.failing = False
        # EndTask again, a call and another EndTask, all at once: the one ending is written once
        again, refusal, last = await asyncio.gather(tasks.end("t", ALICE), tasks.check("t", ALICE, call()),
                                                    tasks.end("t", ALICE))
        assert refusal.startswith("task_ended: task 't' was ended by EndTask at " + ended_at)
        assert again.already_ended and again.receipt is not None and last.receipt == again.receipt
        assert again.ended_at == ended_at
    finally:
        log.close()
    (task_end,) = [r for r in records(tmp_path / "ev") if r["kind"] == "task_end"]
    assert (task_end["seq"], task_end["hash"]) == (again.receipt.seq, again.receipt.hash)
    assert task_end["ended_at"] == ended_at and task_end["ended_by"] == "end_task"
    assert task_end["links"] == [{"trace_id": first.trace_id, "span_id": first.span_id, "type": "task_first_call"}]
    assert verify_dir(tmp_path / "ev").ok


async def test_end_task_on_a_task_idle_past_the_timeout_records_the_idle_timeout(tmp_path, store):
    log = EvidenceLog.open(tmp_path / "ev", instance_id="s", checkpoint_every=0, checkpoint_seconds=0)
    now = [0.0]
    tasks = TaskRegistry(store=store, idle_seconds=30, max_tracked=100, sink=SwitchableSink(log), instance_id="s",
                         clock=lambda: now[0])
    caller = call()
    try:
        assert await tasks.check("t", ALICE, call()) is None
        now[0] = 31
        ending = await tasks.end("t", ALICE, caller)
        assert await tasks.end("t", ALICE) == ending  # the same answer, no second record
    finally:
        log.close()
    assert ending.already_ended and ending.receipt is not None and ending.trace_id == caller.trace_id
    (task_end,) = [r for r in records(tmp_path / "ev") if r["kind"] == "task_end"]
    assert task_end["ended_by"] == "idle_timeout" and task_end["idle_seconds"] == 30
    assert task_end["seq"] == ending.receipt.seq and task_end["parent_span_id"] == caller.span_id


async def test_evidence_show_lists_an_idle_ending_readably_whatever_the_task_id_holds(tmp_path, store):
    log = EvidenceLog.open(tmp_path / "ev", instance_id="s", checkpoint_every=0, checkpoint_seconds=0)
    now = [0.0]
    tasks = TaskRegistry(store=store, idle_seconds=30, max_tracked=100, sink=SwitchableSink(log), instance_id="s",
                         clock=lambda: now[0])
    sneaky = "t-1\x1b[1A\r\x1b[2K\u202e"  # EndTask refuses such an id; a call under it may still use it
    try:
        assert await tasks.check(sneaky, ALICE, call()) is None
        now[0] = 31
        assert (await tasks.check(sneaky, ALICE, call())).startswith("task_ended:")
    finally:
        log.close()
    out = io.StringIO()
    assert show(tmp_path / "ev", Filter(kind="task_end"), as_json=False, out=out) == 1
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    row = text.splitlines()[1]
    assert row.split()[2] == "task_end" and ALICE.subject.spiffe_id in row
    assert row.endswith(f"{FLAG}task 't-1\\x1b[1A\\r\\x1b[2K\\u202e' ended after 30 s without calls (idle timeout)"), row
    assert text.splitlines()[-1].startswith(FLAG)
    as_json = io.StringIO()
    show(tmp_path / "ev", Filter(kind="task_end"), as_json=True, out=as_json)
    assert json.loads(as_json.getvalue())["task_id"] == sneaky and "\x1b" not in as_json.getvalue()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The installed `agent-sidecar` console script, as an auditor runs it."""
    script = Path(sys.executable).parent / "agent-sidecar"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60)


def traceparent(trace: TraceContext) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{trace.trace_id}-{trace.span_id}-01"),)


async def test_end_task_writes_one_task_end_record_chained_before_the_denied_calls(
    tmp_path, sidecar_config, running_sidecar
):
    sidecar = await running_sidecar(sidecar_config(**{"listen.unix": ""}))
    agent_span = TraceContext.new()
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        first = await stub.Authorize(search("task-1"))
        assert first.outcome == sidecar_pb2.OUTCOME_ALLOW
        ended = await stub.EndTask(sidecar_pb2.EndTaskRequest(task_id="task-1"), metadata=traceparent(agent_span))
        assert not ended.already_ended and ended.evidence_seq > 0 and ended.evidence_hash.startswith("sha256:")
        assert ended.trace_id == agent_span.trace_id  # its span joins the caller's trace
        again = await stub.EndTask(sidecar_pb2.EndTaskRequest(task_id="task-1"))
        assert again.already_ended and (again.evidence_seq, again.evidence_hash, again.ended_at) == (
            ended.evidence_seq, ended.evidence_hash, ended.ended_at)  # no second record
        after = await stub.Authorize(search("task-1"))
        assert after.outcome == sidecar_pb2.OUTCOME_DENY and after.reasons[0].startswith("task_ended:")
    await sidecar.stop(grace=0)

    evidence = tmp_path / "evidence"
    written = records(evidence)
    by_decision = {r.get("decision_id"): r for r in written if r["kind"] == "decision"}
    (task_end,) = [r for r in written if r["kind"] == "task_end"]
    assert (task_end["seq"], task_end["hash"]) == (ended.evidence_seq, ended.evidence_hash)
    assert by_decision[first.decision_id]["seq"] < task_end["seq"] < by_decision[after.decision_id]["seq"]
    started = by_decision[first.decision_id]
    assert task_end["task_id"] == "task-1" and task_end["ended_by"] == "end_task"
    assert task_end["subject"] == started["subject"]  # who ended it: the task's own subject
    assert task_end["ended_at"] == ended.ended_at and task_end["idle_seconds"] is None
    assert task_end["last_call_at"] is not None and task_end["last_call_at"] <= task_end["ended_at"]
    assert task_end["reasons"] == [after.reasons[0]]  # why every later call under it is denied
    assert (task_end["trace_id"], task_end["parent_span_id"]) == (agent_span.trace_id, agent_span.span_id)
    assert task_end["links"] == [{"trace_id": first.trace_id, "span_id": started["span_id"], "type": "task_first_call"}]
    assert task_end["sidecar"] == "test-sidecar"

    key = str(dev_key_path(evidence)).replace(".pem", ".pub.pem")
    verified = run_cli("evidence", "verify", str(evidence), "--key", key)
    assert verified.returncode == 0 and "INTACT" in verified.stdout, verified.stdout + verified.stderr
    assert "task_end=1" in verified.stdout
    shown = run_cli("evidence", "show", str(evidence), "--kind", "task_end")
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()
    assert header.split()[:3] == ["SEQ", "TIME", "KIND"]
    assert row.split()[:3] == [str(task_end["seq"]), ended.ended_at, "task_end"]
    assert row.endswith(" task 'task-1' ended by EndTask"), row
    assert f" {started['subject']['spiffe_id']} (dev) " in row, row

    # a task_end record altered breaks the chain: at its own seq, or re-hashed, at the next one
    path = sorted(evidence.glob("evidence-*.jsonl"))[-1]
    original = path.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(original) if json.loads(line)["kind"] == "task_end")
    for rehash, broken_seq in ((False, task_end["seq"]), (True, task_end["seq"] + 1)):
        tampered = dict(json.loads(original[at]), ended_at="2026-01-01T00:00:00.000000Z")
        if rehash:
            tampered["hash"] = record_hash(tampered)
        lines = list(original)
        lines[at] = json.dumps(tampered, sort_keys=True, separators=(",", ":")) + "\n"
        path.write_text("".join(lines))
        broken = run_cli("evidence", "verify", str(evidence), "--key", key)
        assert broken.returncode == 1 and f"BROKEN at seq {broken_seq} " in broken.stdout, broken.stdout


@pytest.fixture
def jaeger(tmp_path):
    with Jaeger(tmp_path / "jaeger") as running:
        yield running


async def test_an_idle_timeout_is_recorded_when_found_before_the_call_it_denies(
    tmp_path, sidecar_config, running_sidecar, jaeger, clean_otel_env
):
    sidecar = await running_sidecar(sidecar_config(**{
        "listen.unix": "", "invoke.task_idle_seconds": 1.0, **jaeger.telemetry_settings("sidecar-tasks-test"),
    }))
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        first = await stub.Authorize(search("task-idle"))
        assert first.outcome == sidecar_pb2.OUTCOME_ALLOW
        await asyncio.sleep(1.5)  # past invoke.task_idle_seconds without a call
        found = await stub.Authorize(search("task-idle"))
        assert found.outcome == sidecar_pb2.OUTCOME_DENY
        assert found.reasons[0].startswith("task_ended: task 'task-idle' ended after 1 s without calls (idle timeout)")
        later = await stub.Authorize(search("task-idle"))
        assert list(later.reasons) == list(found.reasons)
        ended = await stub.EndTask(sidecar_pb2.EndTaskRequest(task_id="task-idle"))
        assert ended.already_ended
    written = records(tmp_path / "evidence")
    by_decision = {r.get("decision_id"): r for r in written if r["kind"] == "decision"}
    (task_end,) = [r for r in written if r["kind"] == "task_end"]  # one, for the call that found it idle
    assert (ended.evidence_seq, ended.evidence_hash) == (task_end["seq"], task_end["hash"])
    denying = by_decision[found.decision_id]
    assert by_decision[first.decision_id]["seq"] < task_end["seq"] == denying["seq"] - 1
    assert by_decision[later.decision_id]["seq"] > denying["seq"]
    assert task_end["ended_by"] == "idle_timeout" and task_end["idle_seconds"] == 1.0
    assert task_end["subject"] == by_decision[first.decision_id]["subject"]
    assert task_end["last_call_at"] < task_end["ended_at"] and found.reasons[0].endswith(task_end["ended_at"] + "; start a new task")
    assert task_end["reasons"] == [found.reasons[0]]
    # its span is a child of the denied call's span, linked to the task's first call
    assert (task_end["trace_id"], task_end["parent_span_id"]) == (found.trace_id, denying["span_id"])

    def task_end_span():
        return next((s for s in jaeger.trace(found.trace_id) if s.name == "sidecar.task_end"), None)

    span = await wait_until_async(task_end_span)
    assert span is not None, "the task_end span did not reach Jaeger"
    assert span.parent_span_id == denying["span_id"] and span.span_id == task_end["span_id"]
    assert ("FOLLOWS_FROM", first.trace_id, by_decision[first.decision_id]["span_id"]) in span.references
    assert span.tags["sidecar.task.id"] == "task-idle" and span.tags["sidecar.task.ended_by"] == "idle_timeout"
    assert span.tags["sidecar.task.idle_seconds"] == 1.0 and span.tags["sidecar.evidence.seq"] == task_end["seq"]
    assert span.tags["spiffe.id"] == task_end["subject"]["spiffe_id"]
    assert span.tags["sidecar.evidence.hash"] == task_end["hash"]
    assert [log["sidecar.reason.code"] for log in span.logs] == ["task_ended"]


async def test_end_task_fails_closed_when_evidence_is_unavailable(tmp_path, sidecar_config, running_sidecar):
    sidecar = await running_sidecar(sidecar_config(**{"listen.unix": ""}))
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        first = await stub.Authorize(search("task-1"))
        assert first.outcome == sidecar_pb2.OUTCOME_ALLOW
        await sidecar.recorder.aclose()  # the evidence log is gone: nothing can be recorded any more
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.EndTask(sidecar_pb2.EndTaskRequest(task_id="task-1"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert info.value.details().startswith("evidence_unavailable: task 'task-1' ended at ")
        after = await stub.Authorize(search("task-1"))
        assert after.outcome == sidecar_pb2.OUTCOME_DENY
    assert not [r for r in records(tmp_path / "evidence") if r["kind"] == "task_end"]


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


# A task id every call accepts must be one EndTask accepts: else a task can be used but never ended
# (tabs, no-break spaces, zero-width and escape characters in the id).
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
    assert [r["task_id"] for r in records(tmp_path / "evidence") if r["kind"] == "task_end"] == [task_id]
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
            refused = await stub.Authorize(sidecar_pb2.AuthorizeRequest(tool="echo", task_id=task_id))
            assert refused.outcome == sidecar_pb2.OUTCOME_DENY and refused.reasons[0].startswith("invalid_task_id:")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.EndTask(sidecar_pb2.EndTaskRequest(task_id=task_id))
        assert info.value.code() == code and info.value.details().startswith("invalid_task:")


@pytest.mark.parametrize("task_id", [
    "t", "a\tb", "a\u00a0b", "a\u200bb", "\x1b[31m", "x" * 256, "x" * 257, "ü" * 128, "ü" * 129,
    "a\x00b", "\x00", "a\ud800", "",
])
def test_endtask_takes_exactly_the_task_ids_a_call_may_use(task_id):
    """EndTask's rule (calls.usable_id, plus not empty) and check_call's agree on every id."""
    problems, _ = check_call(ToolCall(tool="t", arguments={}, task_id=task_id), max_bytes=1 << 20, max_depth=32)
    call_takes = bool(task_id) and not any(p.startswith("invalid_task_id: ") for p in problems)
    assert (bool(task_id) and usable_id(task_id)) == call_takes
