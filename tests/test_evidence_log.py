"""The evidence log: record fields for every outcome, group commit, rotation, restart, failing disks."""

from __future__ import annotations

import asyncio
import errno
import json
import time
from pathlib import Path

import pytest

from sidecar.canonical import canonical_json, sha256_digest
from sidecar.evidence import DecisionEvent, EvidenceError, Receipt, TraceContext
from sidecar.evidence.log import EvidenceLog
from sidecar.evidence.recorder import EvidenceRecorder, open_recorder
from sidecar.evidence.records import GENESIS, record_hash
from sidecar.evidence.signing import dev_signing_key
from sidecar.evidence.verify import verify_dir
from tests.doubles.disk import FaultyDisk
from sidecar.identity import CallerIdentity, Subject

AGENT = "spiffe://example.org/ns/agents/sa/research"
PLANNER = "spiffe://example.org/ns/agents/sa/planner"


def make_event(i: int = 0, **changes) -> DecisionEvent:
    arguments = changes.pop("arguments", {"path": f"/workspace/{i}.txt", "api_token": "tok-SECRET-1"})
    fields = dict(
        time="2026-11-22T10:00:00.000000Z",
        decision_id=f"decision-{i}",
        call_id=f"call-{i}",
        identity=CallerIdentity(
            Subject(AGENT, "workload_api", "2026-11-22T11:00:00Z"), delegation=(Subject(PLANNER, "jwt_svid"),)
        ),
        tool="read_file",
        server="files",
        arguments=arguments,
        arguments_digest=changes.pop("arguments_digest", None) or sha256_digest(canonical_json(arguments)),
        task_id="task-7",
        intent="summarise the notes",
        signals={"risk_score": 0.2, "model": "m-1"},
        outcome="allow",
        reasons=("ok: read_file is allowed in /workspace",),
        obligations={},
        policy_revision="rev-42",
        engine="embedded",
        engine_error=None,
        escalation_id="",
        approver="",
        trace=TraceContext.new(),
        sidecar="sidecar-test-1",
        timings_ms={"engine": 0.25},
    )
    fields.update(changes)
    return DecisionEvent(**fields)


def read_records(directory: Path) -> list[dict]:
    records = []
    for path in sorted(directory.glob("evidence-*.jsonl")):
        records.extend(json.loads(line) for line in path.read_bytes().splitlines())
    return records


@pytest.fixture
async def recorder(tmp_path):
    rec = open_recorder(tmp_path / "ev", instance_id="sidecar-test-1", known_tool=lambda t: t == "read_file")
    yield rec
    await rec.aclose()


OUTCOMES = {
    "allow": dict(outcome="allow", reasons=("ok: read_file is allowed in /workspace",)),
    "deny": dict(outcome="deny", reasons=("path_outside_workspace: /etc/passwd is outside /workspace",)),
    "escalate": dict(
        outcome="escalate",
        reasons=("needs_approval: send_email to an outside address",),
        escalation_id="esc-1",
        obligations={"approvers": ["group:finance"]},
    ),
    "engine_failure": dict(
        outcome="deny",
        reasons=("policy_unavailable: the policy engine timed out after 100 ms",),
        engine_error="policy_unavailable: the policy engine timed out after 100 ms",
    ),
    "unverified": dict(identity=None, outcome="deny", reasons=("unverified_caller: no SVID",), engine="sidecar"),
}


@pytest.mark.parametrize("case", sorted(OUTCOMES))
async def test_every_outcome_is_recorded_with_who_what_why(recorder, tmp_path, case):
    event = make_event(1, **OUTCOMES[case])
    receipt = await recorder.record(event)
    assert isinstance(receipt, Receipt) and receipt.seq == 2  # after the startup record

    records = read_records(tmp_path / "ev")
    record = records[-1]
    assert record["kind"] == "decision" and record["seq"] == receipt.seq and record["hash"] == receipt.hash
    assert record["prev_hash"] == records[-2]["hash"]
    assert record["hash"] == record_hash(record)
    # who
    if event.identity is None:
        assert record["subject"] is None and record["delegation"] == []
    else:
        assert record["subject"] == {"spiffe_id": AGENT, "source": "workload_api", "svid_expires_at": "2026-11-22T11:00:00Z"}
        assert record["delegation"] == [{"spiffe_id": PLANNER, "source": "jwt_svid", "svid_expires_at": None}]
    # what
    assert record["tool"] == "read_file" and record["server"] == "files" and record["tool_known"] is True
    assert record["arguments_digest"] == event.arguments_digest
    assert "arguments" not in record  # digest only unless policy or config allow clear arguments
    assert record["task_id"] == "task-7" and record["intent"] == "summarise the notes"
    assert record["signals"] == {"risk_score": 0.2, "model": "m-1"}
    assert record["call_id"] == "call-1" and record["decision_id"] == "decision-1"
    # why
    assert record["outcome"] == event.outcome and record["reasons"] == list(event.reasons)
    assert record["obligations"] == event.obligations
    assert record["policy_revision"] == "rev-42" and record["engine"] == event.engine
    assert record["engine_error"] == event.engine_error
    # who approved / where
    assert record["escalation_id"] == event.escalation_id and record["approver"] == ""
    assert record["trace_id"] == event.trace.trace_id and record["span_id"] == event.trace.span_id
    assert record["sidecar"] == "sidecar-test-1"
    assert record["time"] == event.time and record["logged_at"].endswith("Z")
    # canonical JSON line
    line = (tmp_path / "ev" / "evidence-000001.jsonl").read_bytes().splitlines()[-1]
    assert line == canonical_json(record)


async def test_the_first_record_is_a_startup_record_starting_the_chain(recorder, tmp_path):
    (startup,) = read_records(tmp_path / "ev")
    assert startup["kind"] == "startup" and startup["seq"] == 1 and startup["prev_hash"] == GENESIS
    assert startup["log_id"] and startup["sidecar"] == "sidecar-test-1" and startup["recovered"] is None
    assert startup["settings"]["signing_key"] == "dev"


async def test_arguments_in_clear_only_when_allowed_and_secrets_never(tmp_path):
    secret_args = {"path": "/w/a", "api_token": "tok-SECRET-1", "nested": {"Password": "hunter2", "keep": 1}, "x_custom": "c"}
    for mode, obligations, expect_clear in (
        ("digest", {"record_arguments": True}, False),
        ("policy", {}, False),
        ("policy", {"record_arguments": True, "redact_arguments": ["x_custom"]}, True),
        ("clear", {}, True),
    ):
        directory = tmp_path / f"{mode}-{len(obligations)}"
        rec = open_recorder(directory, arguments=mode, redact_keys=["custom"], instance_id="s")
        try:
            await rec.record(make_event(1, arguments=secret_args, obligations=obligations))
        finally:
            await rec.aclose()
        raw = b"".join(p.read_bytes() for p in directory.glob("evidence-*.jsonl"))
        assert b"tok-SECRET-1" not in raw and b"hunter2" not in raw, mode
        record = [r for r in read_records(directory) if r["kind"] == "decision"][0]
        if expect_clear:
            assert record["arguments"] == {
                "path": "/w/a",
                "api_token": "[REDACTED]",
                "nested": {"Password": "[REDACTED]", "keep": 1},
                "x_custom": "[REDACTED]",
            }
            assert record["redacted"] == ["arguments.api_token", "arguments.nested.Password", "arguments.x_custom"]
        else:
            assert "arguments" not in record
        assert record["arguments_digest"] == sha256_digest(canonical_json(secret_args))


async def test_values_without_canonical_json_are_recorded_as_placeholders(recorder, tmp_path):
    await recorder.record(make_event(1, signals={"risk_score": float("nan")}, obligations={"big": 2**60}))
    record = read_records(tmp_path / "ev")[-1]
    assert "unrecordable" in record["signals"]["risk_score"] and "unrecordable" in record["obligations"]["big"]
    assert record["signals"]["risk_score"]["repr_digest"].startswith("sha256:")
    assert verify_dir(tmp_path / "ev").ok


async def test_group_commit_shares_syncs_under_concurrent_load(recorder, tmp_path):
    receipts = await asyncio.gather(*(recorder.record(make_event(i)) for i in range(300)))
    assert sorted(r.seq for r in receipts) == list(range(2, 302))
    assert len({r.hash for r in receipts}) == 300
    # one sync for the startup record, then far fewer than one per record
    assert recorder.log.syncs < 60, recorder.log.syncs
    assert verify_dir(tmp_path / "ev").ok


async def test_record_is_on_disk_when_record_returns(faulty_disk, tmp_path):
    recorder, disk = faulty_disk
    syncs_before = len(disk.synced)
    receipt = await recorder.record(make_event(1))
    data = (tmp_path / "ev" / "evidence-000001.jsonl").read_bytes()
    record_end = data.index(receipt.hash.encode())
    record_end = data.index(b"\n", record_end) + 1
    synced_sizes = [size for _, size in disk.synced[syncs_before:]]
    assert synced_sizes and max(synced_sizes) >= record_end, "no sync covered the record before the receipt"
    assert read_records(tmp_path / "ev")[-1]["hash"] == receipt.hash


async def test_rotation_continues_the_chain_across_files(tmp_path):
    rec = open_recorder(tmp_path / "ev", rotate_bytes=4096, checkpoint_every=25, instance_id="s")
    try:
        for i in range(60):
            await rec.record(make_event(i))
    finally:
        await rec.aclose()
    files = sorted((tmp_path / "ev").glob("evidence-*.jsonl"))
    assert len(files) > 5
    records = read_records(tmp_path / "ev")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    for before, after in zip(records, records[1:]):
        assert after["prev_hash"] == before["hash"]
    report = verify_dir(tmp_path / "ev")
    assert report.ok, report.problems
    assert report.checkpoints >= 2 and report.files == len(files)


async def test_restart_continues_the_chain_with_a_new_startup_record(tmp_path):
    directory = tmp_path / "ev"
    first = open_recorder(directory, instance_id="one")
    last = await first.record(make_event(1))
    await first.aclose()
    second = open_recorder(directory, instance_id="two")
    try:
        await second.record(make_event(2))
    finally:
        await second.aclose()
    records = read_records(directory)
    startups = [r for r in records if r["kind"] == "startup"]
    assert len(startups) == 2 and startups[0]["log_id"] == startups[1]["log_id"]
    assert startups[1]["sidecar"] == "two"
    # first close wrote a final checkpoint; the second startup follows it
    assert records[last.seq]["kind"] == "checkpoint"
    assert verify_dir(directory).ok


async def test_torn_last_line_is_cut_kept_aside_and_reported(tmp_path):
    directory = tmp_path / "ev"
    rec = open_recorder(directory, instance_id="one")
    receipt = await rec.record(make_event(1))
    rec.log.close(checkpoint=False)
    path = directory / "evidence-000001.jsonl"
    torn = b'{"approver":"","arguments_digest":"sha256:ab'
    with open(path, "ab") as f:
        f.write(torn)
    assert not verify_dir(directory).problems  # a torn tail is a warning, not tampering
    assert any("unterminated" in w for w in verify_dir(directory).warnings)

    reopened = open_recorder(directory, instance_id="two")
    await reopened.aclose()
    records = read_records(directory)
    startup = [r for r in records if r["kind"] == "startup"][-1]
    assert startup["prev_hash"] == receipt.hash and startup["seq"] == receipt.seq + 1
    assert startup["recovered"]["bytes"] == len(torn)
    assert (directory / startup["recovered"]["kept_as"]).read_bytes() == torn
    assert verify_dir(directory).ok


async def test_damaged_complete_last_record_refuses_to_open(tmp_path):
    directory = tmp_path / "ev"
    rec = open_recorder(directory, instance_id="one")
    await rec.record(make_event(1))
    rec.log.close(checkpoint=False)
    path = directory / "evidence-000001.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"outcome":"allow"', b'"outcome":"deny!"'))
    with pytest.raises(EvidenceError, match="damaged"):
        open_recorder(directory, instance_id="two")


@pytest.fixture
async def tiny_recorder(tiny_volume, tmp_path):
    """A recorder whose evidence directory is on the 256 KiB tmpfs; its key and mirror live off it."""
    rec = open_recorder(tiny_volume.path / "ev", instance_id="sidecar-test-1", signing_key=dev_signing_key(tmp_path / "key.pem"),
                        checkpoint_mirror=str(tmp_path / "cp.jsonl"))
    yield rec
    await rec.aclose()


# A record longer than a page (an intent of MAX_INTENT_BYTES) needs a new block of the
# volume whatever room is left in the log file's last page: once the volume is full, its
# write is cut short by the kernel and then fails with ENOSPC.
PAGE_FILLING = dict(intent="x" * 4096)


async def test_a_full_volume_raises_evidence_error_degrades_health_and_recovers(tiny_recorder, tiny_volume, tmp_path):
    directory = tiny_volume.path / "ev"
    good = await tiny_recorder.record(make_event(1))
    tiny_volume.fill()
    with pytest.raises(EvidenceError, match="no space left"):
        await tiny_recorder.record(make_event(2, **PAGE_FILLING))
    ok, detail = tiny_recorder.health()
    assert not ok and "no space left" in detail

    tiny_volume.free()
    after = await tiny_recorder.record(make_event(3))
    assert after.seq == good.seq + 1  # the refused record never entered the chain
    assert tiny_recorder.health()[0]
    ids = [r.get("decision_id") for r in read_records(directory)]
    assert "decision-2" not in ids and ids[-1] == "decision-3"
    await tiny_recorder.aclose()  # the closing checkpoint, mirrored off the volume
    report = verify_dir(directory, mirror=tmp_path / "cp.jsonl")
    assert report.ok, report.problems


@pytest.fixture
async def faulty_disk(tmp_path):
    """A recorder whose log makes its data syncs through FaultyDisk (tests/doubles/disk.py), and that double."""
    disk = FaultyDisk()
    log = EvidenceLog.open(tmp_path / "ev", instance_id="sidecar-test-1", file_io=disk)
    rec = EvidenceRecorder(log, None, known_tool=lambda t: t == "read_file")
    yield rec, disk
    disk.release()
    await rec.aclose()


async def test_sync_failure_is_an_evidence_error(faulty_disk):
    recorder, disk = faulty_disk
    disk.sync_error = OSError(errno.EIO, "Input/output error")
    with pytest.raises(EvidenceError, match="Input/output error"):
        await recorder.record(make_event(1))
    assert not recorder.health()[0]


def test_an_unwritable_directory_refuses_to_open(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(EvidenceError):
        open_recorder(blocker / "ev", instance_id="s")


async def test_two_writers_cannot_share_a_directory(recorder, tmp_path):
    with pytest.raises(EvidenceError, match="in use"):
        open_recorder(tmp_path / "ev", instance_id="other")


async def test_checkpoints_by_count_and_time_and_mirror(tmp_path):
    directory = tmp_path / "ev"
    rec = open_recorder(directory, checkpoint_every=10, checkpoint_seconds=0.2, instance_id="s")
    try:
        for i in range(10):
            await rec.record(make_event(i))
        await rec.record(make_event(99))
        deadline = time.monotonic() + 60  # the timer writes a checkpoint for the one record since
        while sum(r["kind"] == "checkpoint" for r in read_records(directory)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        records = read_records(directory)
    finally:
        await rec.aclose()
    checkpoints = [r for r in records if r["kind"] == "checkpoint"]
    assert len(checkpoints) == 2
    first = checkpoints[0]
    assert first["checkpoint"]["seq"] == first["seq"] - 1 and first["checkpoint"]["head_hash"] == first["prev_hash"]
    assert first["signer"]["source"] == "dev" and first["signature"]["alg"] == "ed25519"
    mirror = [json.loads(line) for line in (tmp_path / "ev-checkpoints.jsonl").read_bytes().splitlines()]
    assert [m["hash"] for m in mirror][:2] == [c["hash"] for c in checkpoints]


async def test_other_kinds_are_appended_to_the_same_chain(recorder, tmp_path):
    receipt = await recorder.append("approval", {"escalation_id": "esc-1", "approver": "alice", "time": "2026-11-22T10:00:01Z"})
    assert receipt.seq == 2
    with pytest.raises(EvidenceError):
        await recorder.append("checkpoint", {})
    with pytest.raises(EvidenceError):
        await recorder.append("gossip", {})
    with pytest.raises(EvidenceError):
        await recorder.append("approval", {"seq": 7})
    assert read_records(tmp_path / "ev")[-1]["approver"] == "alice"


async def test_gate_denies_when_evidence_cannot_be_written(tiny_recorder, tiny_volume):
    from sidecar.calls import CallIdRegistry, ToolCall
    from sidecar.gate import Gate
    from sidecar.policy.decision import Decision
    from sidecar.server import default_steps
    from sidecar.steps import AskPolicy
    from sidecar.usage.memory import MemoryCounter

    class AllowAll:
        revision = "rev-1"

        async def decide(self, document):
            return Decision("allow", ("ok: test",), {}, "rev-1", "fake")

        def ready(self):
            return True, "always"

        async def aclose(self):
            pass

        def entry(self, tool):
            return {"name": tool}

    allow_all = AllowAll()
    ask = AskPolicy(decisions=allow_all, catalog=allow_all, usage=MemoryCounter(60, 100), instance_id="sidecar-test-1")
    steps = default_steps(policy=ask, call_ids=CallIdRegistry(100), max_input_bytes=1 << 20, max_depth=32)
    gate = Gate(steps=steps, policy=ask, recorder=tiny_recorder, instance_id="sidecar-test-1")
    identity = CallerIdentity(Subject(AGENT, "dev"))
    allowed = await gate.authorize(ToolCall("read_file", {"path": "/w"}), identity)
    assert allowed.decision.outcome == "allow" and allowed.receipt is not None

    tiny_volume.fill()
    denied = await gate.authorize(ToolCall("read_file", {"path": "/w"}, **PAGE_FILLING), identity)
    assert denied.decision.outcome == "deny" and denied.receipt is None
    assert denied.decision.reasons[0].startswith("evidence_unavailable:")


def test_records_direct_log_api(tmp_path):
    log = EvidenceLog.open(tmp_path / "ev", instance_id="s", checkpoint_every=0, checkpoint_seconds=0)
    try:
        r = log.append_sync("expiry", {"escalation_id": "esc-9"})
        assert r.seq == 2
    finally:
        log.close()


def test_recorder_rejects_unknown_argument_mode(tmp_path):
    log = EvidenceLog.open(tmp_path / "ev", instance_id="s")
    try:
        with pytest.raises(ValueError):
            EvidenceRecorder(log, None, arguments_mode="sometimes")
    finally:
        log.close()


async def test_a_disk_that_hangs_denies_after_the_record_timeout(faulty_disk):
    recorder, disk = faulty_disk
    recorder.record_timeout = 0.2
    disk.hold()
    try:
        with pytest.raises(EvidenceError, match="did not confirm"):
            await recorder.record(make_event(1))
    finally:
        disk.release()


async def test_a_bug_in_the_writer_fails_the_batch_instead_of_hanging(recorder, monkeypatch):
    import sidecar.evidence.log as log_module

    def broken(record):
        raise RuntimeError("boom")

    monkeypatch.setattr(log_module, "seal", broken)
    with pytest.raises(EvidenceError, match="internal error"):
        await asyncio.wait_for(recorder.record(make_event(1)), 30)  # a hang, not a slow machine
    monkeypatch.undo()
    assert (await recorder.record(make_event(2))).seq == 2


def test_prepare_recorder_defaults_are_the_config_defaults():
    """prepare_recorder (open_recorder's too) takes plain values; its defaults must not drift from config.py's
    (docs/configuration.md)."""
    import inspect

    from sidecar.config import EvidenceConfig, TelemetryConfig
    from sidecar.evidence.recorder import prepare_recorder

    parameters = inspect.signature(prepare_recorder).parameters
    evidence, telemetry = EvidenceConfig(), TelemetryConfig()
    for name in ("checkpoint_mirror", "rotate_bytes", "checkpoint_every", "checkpoint_seconds",
                 "max_pending", "arguments"):
        assert parameters[name].default == getattr(evidence, name), name
    # the key itself, read by server.read_start_files: none configured is none given
    assert parameters["signing_key"].default is None and evidence.signing_key == ""
    assert list(parameters["redact_keys"].default) == evidence.redact_keys
    for name in ("service_name", "max_backoff_seconds"):
        assert parameters[name].default == getattr(telemetry, name), name


async def test_waiters_on_the_loop_and_on_threads_share_a_batch_and_one_that_gave_up_still_lands(tmp_path):
    """Records awaited on the event loop (`append`) and from threads (`append_sync`) complete from the
    same commits; a caller that stops waiting (its time budget) does not stop its record or the ones after."""
    log = EvidenceLog.open(tmp_path / "ev", instance_id="s", checkpoint_every=0, checkpoint_seconds=0)
    try:
        from_threads = [asyncio.to_thread(log.append_sync, "expiry", {"escalation_id": f"t-{i}"}, 5) for i in range(20)]
        from_loop = [log.append("expiry", {"escalation_id": f"l-{i}"}) for i in range(20)]
        receipts = await asyncio.gather(*from_threads, *from_loop)
        assert sorted(r.seq for r in receipts) == list(range(2, 42))
        impatient = asyncio.ensure_future(log.append("expiry", {"escalation_id": "gave-up"}))
        await asyncio.sleep(0)  # queued, now waiting for the disk
        impatient.cancel()
        after = await log.append("expiry", {"escalation_id": "after"})
        records = [json.loads(line) for path in sorted((tmp_path / "ev").glob("evidence-*.jsonl"))
                   for line in path.read_text().splitlines()]
        ids = [r.get("escalation_id") for r in records]
        assert after.seq == len(records) and ids[-1] == "after"
        assert "gave-up" in ids and impatient.cancelled()
    finally:
        log.close()
    assert verify_dir(tmp_path / "ev").ok


async def test_a_decision_and_its_escalation_are_one_unit_consecutive_under_concurrent_load(recorder, tmp_path):
    """`followed_by` records land right after their decision, in its sync, however many records race."""
    units = [
        recorder.record(make_event(i, **OUTCOMES["escalate"]), followed_by=[("escalation", {"escalation_id": f"esc-{i}"})])
        for i in range(100)
    ]
    singles = [recorder.record(make_event(1000 + i)) for i in range(100)]
    receipts = await asyncio.gather(*units, *singles)
    by_seq = {r["seq"]: r for r in read_records(tmp_path / "ev")}
    for i, receipt in enumerate(receipts[:100]):
        decision, escalation = by_seq[receipt.seq], by_seq[receipt.seq + 1]
        assert (decision["kind"], decision["decision_id"], decision["hash"]) == ("decision", f"decision-{i}", receipt.hash)
        assert (escalation["kind"], escalation["escalation_id"]) == ("escalation", f"esc-{i}")
    assert len(by_seq) == 1 + 300
    assert verify_dir(tmp_path / "ev").ok


async def test_a_unit_is_refused_whole_when_one_of_its_records_cannot_be_written(recorder, tmp_path, monkeypatch):
    """Neither record of a unit lands without the other: a follower that cannot be sealed (a fault
    injected into `seal`; the placeholder rule leaves real values no way to get here) refuses its
    decision too, and the chain goes on from the record before them."""
    import sidecar.evidence.log as log_module
    from sidecar.canonical import NotCanonicalizable

    real_seal = log_module.seal

    def seal(record):
        if record.get("poison"):
            raise NotCanonicalizable("injected")
        return real_seal(record)

    monkeypatch.setattr(log_module, "seal", seal)
    with pytest.raises(EvidenceError, match="no canonical form"):
        await recorder.record(make_event(1), followed_by=[("escalation", {"escalation_id": "esc-1", "poison": True})])
    for follower in (("gossip", {}), ("escalation", {"seq": 9}), ("checkpoint", {})):
        with pytest.raises(EvidenceError, match="kind|may not set"):
            await recorder.record(make_event(2), followed_by=[follower])
    after = await recorder.record(make_event(3))
    records = read_records(tmp_path / "ev")
    assert [r["kind"] for r in records] == ["startup", "decision"] and after.seq == 2
    assert records[-1]["decision_id"] == "decision-3"
    assert verify_dir(tmp_path / "ev").ok


async def test_a_failed_sync_leaves_no_record_of_the_unit(faulty_disk, tmp_path):
    recorder, disk = faulty_disk
    disk.sync_error = OSError(errno.EIO, "Input/output error")
    with pytest.raises(EvidenceError, match="Input/output error"):
        await recorder.record(make_event(1), followed_by=[("escalation", {"escalation_id": "esc-1"})])
    disk.sync_error = None
    receipt = await recorder.record(make_event(2), followed_by=[("escalation", {"escalation_id": "esc-2"})])
    records = read_records(tmp_path / "ev")
    assert [(r["kind"], r.get("escalation_id") or r.get("decision_id")) for r in records[1:]] == [
        ("decision", "decision-2"), ("escalation", "esc-2"),
    ]
    assert receipt.seq == 2 and verify_dir(tmp_path / "ev").ok
