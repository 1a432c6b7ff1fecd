"""An ended task never comes back: not after a crash, nor when tasks.db is lost (docs/mcp.md#tasks).

tasks.db holds every ending before EndTask answers, so a restart, SIGKILL included, keeps them. The
file itself can still be lost apart from the evidence log: deleted, emptied, or put back from an
older backup. The log's `task_end` records then hold what the store lacks, and the sidecar restores
those endings at start, each as it first answered (the same ended_at and record). A store that
cannot be opened at all stops the start. Each kind of loss is produced for real on the files
between one sidecar and the next.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from sidecar.client import AsyncClient, build_request
from sidecar.evidence.log import EvidenceLog
from sidecar.evidence.verify import verify_dir
from sidecar.sqlitedb import database_files
from sidecar.task_store import StoredTask, TaskStore, TaskStoreError
from sidecar.tasks import TaskOwnerMismatch, TaskRegistry, caller_fields
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.doubles.escalation import records
from tests.test_escalation_durability import LogReader
from tests.test_evidence_crash import serving_sidecar, write_sidecar_files
from tests.test_invoke_tasks import ALICE, BOB, SwitchableSink, call, run_cli, search

RESTORED = "tasks: restored "


def end_request(task_id: str) -> sidecar_pb2.EndTaskRequest:
    return sidecar_pb2.EndTaskRequest(task_id=task_id)


def answer(ended: sidecar_pb2.EndTaskResponse) -> tuple[str, int, str, str]:
    """What EndTask said of an ending: the same after any restart or restore."""
    return ended.ended_at, ended.evidence_seq, ended.evidence_hash, ended.trace_id


def delete(database: Path) -> None:
    for path in database_files(database):
        path.unlink(missing_ok=True)


def empty(database: Path) -> None:
    delete(database)
    database.write_bytes(b"")


async def test_sigkill_of_the_real_sidecar_brings_no_ended_task_back(tmp_path):
    """The real sidecar, killed with -9 and started again on the same evidence directory: the task ended
    before the kill is still refused with its first ending and record, and the open task goes on."""
    config, socket_path, directory = write_sidecar_files(tmp_path)
    sidecar = serving_sidecar(config)
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            stub = sidecar_pb2_grpc.ToolGateStub(channel)
            for task_id in ("ended", "open"):
                allowed = await stub.Authorize(build_request("echo", {"n": 1}, task_id=task_id))
                assert allowed.outcome == sidecar_pb2.OUTCOME_ALLOW
            ended = await stub.EndTask(end_request("ended"))
        sidecar.send_signal(signal.SIGKILL)
        sidecar.wait(15)
        sidecar.start()
        sidecar.wait_serving()
        async with AsyncClient(f"unix:{socket_path}") as client:
            refused = await client.authorize("echo", {"n": 3}, task_id="ended")
            assert list(refused.reasons) == [
                f"task_ended: task 'ended' was ended by EndTask at {ended.ended_at}; start a new task"]
            assert (await client.authorize("echo", {"n": 4}, task_id="open")).outcome == "allow"
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            again = await sidecar_pb2_grpc.ToolGateStub(channel).EndTask(end_request("ended"))
        assert again.already_ended and answer(again) == answer(ended)
    finally:
        sidecar.close()
    assert RESTORED not in sidecar.text()  # the store lost nothing: nothing to restore
    assert [r["task_id"] for r in records(directory) if r["kind"] == "task_end"] == ["ended"]


@pytest.mark.parametrize("lose", [delete, empty], ids=["deleted", "emptied"])
async def test_a_lost_task_store_brings_no_ended_task_back(tmp_path, lose):
    """tasks.db deleted (with its -wal and -shm) or emptied between two runs of the real sidecar: the
    next start restores every ending from the log, says so once, and each answers as it first did;
    an open task, never in the log, is the one thing lost. The run after that restores nothing."""
    config, socket_path, directory = write_sidecar_files(tmp_path)
    sidecar = serving_sidecar(config)
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            stub = sidecar_pb2_grpc.ToolGateStub(channel)
            allowed = await stub.Authorize(build_request("echo", {"n": 1}, task_id="used"))
            assert allowed.outcome == sidecar_pb2.OUTCOME_ALLOW
            first = {task_id: await stub.EndTask(end_request(task_id)) for task_id in ("used", "never-used")}
        assert sidecar.stop() == 0
        lose(directory / "tasks.db")

        restarted_at = len(sidecar.text())
        sidecar.start()
        sidecar.wait_serving()
        second_run = sidecar.text()[restarted_at:]
        assert second_run.count(RESTORED) == 1
        assert "restored 2 ended task(s) from their task_end records in the evidence log" in second_run
        assert str(directory / "tasks.db") in second_run
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            stub = sidecar_pb2_grpc.ToolGateStub(channel)
            for task_id, ended in first.items():
                refused = await stub.Authorize(build_request("echo", {"n": 2}, task_id=task_id))
                assert list(refused.reasons) == [
                    f"task_ended: task '{task_id}' was ended by EndTask at {ended.ended_at}; start a new task"]
                again = await stub.EndTask(end_request(task_id))
                assert again.already_ended and answer(again) == answer(ended)
        assert sidecar.stop() == 0

        restarted_at = len(sidecar.text())
        sidecar.start()
        sidecar.wait_serving()
        assert RESTORED not in sidecar.text()[restarted_at:]
    finally:
        sidecar.close()
    assert sorted(r["task_id"] for r in records(directory) if r["kind"] == "task_end") == ["never-used", "used"]
    assert verify_dir(directory).ok


def backup(database: Path, to: Path) -> None:
    """A consistent copy of the live store, as `sqlite3 tasks.db .backup` makes it."""
    with sqlite3.connect(database) as source, sqlite3.connect(to) as target:
        source.backup(target)


async def test_an_older_backup_of_the_task_store_gets_the_endings_made_after_it(
    tmp_path, sidecar_config, running_sidecar, caplog
):
    """tasks.db put back from a backup taken while the sidecar ran: the endings it holds stay as they
    are; those made after it come back from the log, whether the backup held the task open ("after"),
    not at all ("unseen"), or the idle timeout ended it ("idle")."""
    cfg = sidecar_config(**{"listen.unix": "", "invoke.task_idle_seconds": 2})
    database = tmp_path / "evidence" / "tasks.db"
    first = await running_sidecar(cfg)
    async with grpc.aio.insecure_channel(first.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        for task_id in ("before", "after", "idle"):
            assert (await stub.Authorize(search(task_id))).outcome == sidecar_pb2.OUTCOME_ALLOW
        ended = {"before": await stub.EndTask(end_request("before"))}
        backup(database, tmp_path / "backup.db")
        ended["after"] = await stub.EndTask(end_request("after"))
        ended["unseen"] = await stub.EndTask(end_request("unseen"))
        time.sleep(2.2)
        idle = await stub.Authorize(search("idle"))
        assert idle.reasons[0].startswith("task_ended: task 'idle' ended after 2 s without calls (idle timeout)")
        ended["idle"] = await stub.EndTask(end_request("idle"))
    await first.stop(grace=0)
    delete(database)
    (tmp_path / "backup.db").rename(database)

    caplog.set_level(logging.WARNING, logger="sidecar.tasks")
    second = await running_sidecar(cfg)
    (restored,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith(RESTORED)]
    assert restored.startswith("tasks: restored 3 ended task(s)")
    seqs = sorted(ended[task_id].evidence_seq for task_id in ("after", "unseen", "idle"))
    assert f"(seq {seqs[0]} to {seqs[-1]}, " in restored
    async with grpc.aio.insecure_channel(second.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        refused = await stub.Authorize(search("idle"))
        assert list(refused.reasons) == list(idle.reasons)  # the idle ending's own words
        for task_id, first_answer in ended.items():
            again = await stub.EndTask(end_request(task_id))
            assert again.already_ended and answer(again) == answer(first_answer), task_id
    task_ends = [r["task_id"] for r in records(tmp_path / "evidence") if r["kind"] == "task_end"]
    assert sorted(task_ends) == ["after", "before", "idle", "unseen"]  # one record each, none written again


def test_serve_refuses_to_start_when_the_task_store_cannot_be_opened(tmp_path):
    """A task store that cannot be opened stops the start: exit 2, saying which store and file, nothing served."""
    config, socket_path, directory = write_sidecar_files(tmp_path)
    (directory / "tasks.db").mkdir(parents=True)  # a directory where the SQLite file must be
    done = run_cli("serve", "--config", str(config))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "agent-sidecar: the task store cannot be opened: cannot open the task store" in done.stderr
    assert str(directory / "tasks.db") in done.stderr
    assert not socket_path.exists()


async def ended_in_log(directory: Path, database: Path, **registry) -> dict:
    """End "a" by EndTask and "b" by idle timeout with a registry over a real log and store, then close
    both: {task_id: (refusal, TaskEnd)} as that registry answered."""
    evidence_log = EvidenceLog.open(directory, instance_id="s", checkpoint_every=0, checkpoint_seconds=0)
    now = [0.0]
    try:
        async with TaskStore(database) as store, TaskRegistry(
            store=store, idle_seconds=30, max_tracked=100, sink=SwitchableSink(evidence_log), instance_id="s",
            clock=lambda: now[0], **registry,
        ) as tasks:
            assert await tasks.check("b", BOB, call()) is None
            ending_a = await tasks.end("a", ALICE)
            now[0] = 31
            refusal_b = await tasks.check("b", BOB, call())
            return {"a": (await tasks.check("a", ALICE, call()), ending_a),
                    "b": (refusal_b, await tasks.end("b", BOB))}
    finally:
        evidence_log.close()


async def test_an_ending_is_restored_whatever_its_age(tmp_path):
    """A new store restores every ending the log holds: the sidecar starting a year after the endings
    (no TTL bounds a task id: it can be named again at any time) answers both as they first were."""
    first = await ended_in_log(tmp_path / "ev", tmp_path / "tasks.db")
    a_year_later = time.time() + 365 * 86400
    async with TaskStore(tmp_path / "new.db") as store, TaskRegistry(
        store=store, idle_seconds=30, max_tracked=100, evidence_reader=LogReader(tmp_path / "ev"),
        wall_clock=lambda: a_year_later,
    ) as tasks:
        for (task_id, (refusal, ending)), who in zip(first.items(), (ALICE, BOB)):
            assert await tasks.check(task_id, who, call()) == refusal
            again = await tasks.end(task_id, who)
            assert (again.ended_at, again.receipt, again.trace_id) == (ending.ended_at, ending.receipt, ending.trace_id)
            assert again.already_ended
            with pytest.raises(TaskOwnerMismatch):  # its owner came back with it
                await tasks.end(task_id, BOB if who is ALICE else ALICE)
        # the read-back is the store's newest change: the next start reads the log from there on
        assert await store.latest_change() == a_year_later


@pytest.mark.parametrize("changed_after, restored", [(10.0, True), (50.0, False)])
async def test_the_log_is_read_back_from_shortly_before_the_task_stores_newest_change(
    tmp_path, changed_after, restored
):
    """A store that holds a change `changed_after` s after the endings were logged: within
    RESTORE_MARGIN_SECONDS (30) the endings are read back and restored; past it, the store held them
    (its later change was committed after theirs) unless someone deleted rows by hand, and the log is
    not read that far (docs/mcp.md#tasks states this bound)."""
    await ended_in_log(tmp_path / "ev", tmp_path / "tasks.db")
    logged = time.time()
    async with TaskStore(tmp_path / "rows-lost.db") as store:
        await store.open_task(StoredTask("later", BOB.subject.spiffe_id, caller_fields(BOB), None,
                                         logged + changed_after))
        async with TaskRegistry(store=store, idle_seconds=30, max_tracked=100,
                                evidence_reader=LogReader(tmp_path / "ev"), wall_clock=lambda: logged + 100) as tasks:
            refusal = await tasks.check("a", ALICE, call())
    assert (refusal is not None and refusal.startswith("task_ended: task 'a' was ended by EndTask")) == restored


async def test_a_log_that_cannot_be_read_back_stops_the_start(tmp_path):
    """The store may lack endings only the log holds: a log that cannot be read stops the start
    (TaskStoreError: `serve` exits 2), rather than serve with ended tasks usable again."""
    await ended_in_log(tmp_path / "ev", tmp_path / "tasks.db")
    (tmp_path / "ev" / "evidence-999999.jsonl").mkdir()  # the newest "file" cannot be read
    async with TaskStore(tmp_path / "new.db") as store:
        with pytest.raises(TaskStoreError, match=r"could not be read back \(\[Errno 21\] Is a directory"):
            async with TaskRegistry(store=store, idle_seconds=30, max_tracked=100,
                                    evidence_reader=LogReader(tmp_path / "ev")):
                pass
        assert await store.get("a") is None  # nothing was half restored


async def test_an_ending_whose_task_id_was_redacted_is_reported_not_restored(tmp_path, caplog):
    """A task id that reads as a secret is redacted in its task_end record: the log cannot say which task
    ended, so it cannot be restored. The start says so, naming the record, and restores the others."""
    evidence_log = EvidenceLog.open(tmp_path / "ev", instance_id="s", checkpoint_every=0, checkpoint_seconds=0)
    try:
        async with TaskStore(tmp_path / "tasks.db") as store:
            tasks = TaskRegistry(store=store, idle_seconds=0, max_tracked=100, sink=SwitchableSink(evidence_log))
            secret = await tasks.end("token=s3cr3t-value-123", ALICE)
            plain = await tasks.end("plain", ALICE)
    finally:
        evidence_log.close()
    (redacted,) = [r for r in records(tmp_path / "ev") if r["kind"] == "task_end" and r["seq"] == secret.receipt.seq]
    assert redacted["task_id"] == "token=[REDACTED]" and "task_id" in redacted["redacted"]

    caplog.set_level(logging.WARNING, logger="sidecar.tasks")
    async with TaskStore(tmp_path / "new.db") as store:
        async with TaskRegistry(store=store, idle_seconds=0, max_tracked=100,
                                evidence_reader=LogReader(tmp_path / "ev")) as tasks:
            assert (await tasks.end("plain", ALICE)).receipt == plain.receipt
        assert await store.get("token=[REDACTED]") is None
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "tasks: restored 1 ended task(s)" in messages
    assert (f"1 task_end record(s) read back from the evidence log name no task that can be restored "
            f"(seq [{secret.receipt.seq}])") in messages


async def test_of_two_task_end_records_for_one_task_the_first_is_restored(tmp_path):
    """A crash between a task_end record and the store's mark of it lets the next start write the record
    again: the first is the ending EndTask answered, and the one restored."""
    first = await ended_in_log(tmp_path / "ev", tmp_path / "tasks.db")
    (original,) = [r for r in records(tmp_path / "ev") if r["kind"] == "task_end" and r["task_id"] == "a"]
    evidence_log = EvidenceLog.open(tmp_path / "ev", instance_id="s", checkpoint_every=0, checkpoint_seconds=0)
    try:
        fields = {k: v for k, v in original.items() if k not in ("kind", "seq", "prev_hash", "logged_at", "hash")}
        evidence_log.append_sync("task_end", {**fields, "ended_at": "2999-01-01T00:00:00.000000Z"})
    finally:
        evidence_log.close()
    async with TaskStore(tmp_path / "new.db") as store, TaskRegistry(
        store=store, idle_seconds=30, max_tracked=100, evidence_reader=LogReader(tmp_path / "ev"),
    ) as tasks:
        again = await tasks.end("a", ALICE)
    refusal, ending = first["a"]
    assert (again.ended_at, again.receipt) == (ending.ended_at, ending.receipt)
