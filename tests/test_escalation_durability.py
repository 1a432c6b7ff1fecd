"""A new escalation is durable through its evidence record: after a host crash the store is mended from the log.

SQLite commits a new escalation without its own fsync (sidecar/escalation/store.py, Durability), so a
power loss can take the row while the log, synced before the agent heard of it, keeps its
`escalation` record. A real power loss cannot be produced in a test: here the rows are deleted from
escalations.db between a sidecar's stop and its next start, which leaves the file exactly as such a
loss would (the store without its newest commits, the log with them).
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.client import AsyncClient
from sidecar.escalation import APPROVED, PENDING, USED
from sidecar.escalation.evidence import EscalationEvidence
from sidecar.escalation.client import ApprovalsClient, ApprovalsError
from sidecar.escalation.service import EscalationService, new_escalation_id
from sidecar.escalation.store import SqliteStore
from sidecar.evidence.log import EvidenceLog
from sidecar.evidence.records import rfc3339
from sidecar.evidence.readback import records_since
from sidecar.evidence.verify import verify_dir
from tests.conftest import write_policy
from tests.doubles.escalation import (
    ALICE,
    CFO,
    ESCALATION_DATA,
    ESCALATION_POLICY,
    decide,
    make_config,
    records_of,
    store_settings,
)
from tests.test_evidence_crash import serving_sidecar
from tests.test_escalation_store import NOW, record, stores  # noqa: F401  (fixture)

EMAIL = {"to": "cfo@example.com", "body": "Q3 numbers", "api_token": "s3cret-token"}
INTENT = "Send the Q3 numbers to the CFO"
SIGNALS = {"risk_score": 0.82, "model": "claude-test"}


def lose_rows(database: Path, *escalation_ids: str) -> None:
    """The host crash: the store comes back without these rows (module docstring)."""
    with sqlite3.connect(database) as conn:
        for escalation_id in escalation_ids:
            assert conn.execute("DELETE FROM sidecar_escalations WHERE id = ?", (escalation_id,)).rowcount == 1


@pytest.fixture
def config(tmp_path):
    def make(**overrides):
        return make_config(tmp_path, store_settings("sqlite", tmp_path), **overrides)

    return make


async def test_a_lost_escalation_comes_back_pending_and_can_be_approved(config, running_sidecar, tmp_path, caplog):
    cfg = config(**{"escalation.approvers": [ALICE, CFO]})
    first = await running_sidecar(cfg)
    async with AsyncClient(first.addresses[0]) as agent, ApprovalsClient(first.addresses[0]) as approvals:
        kept = await agent.authorize("wire_money", {"amount": 12.5, "to": "acme"})
        lost = await agent.authorize("send_email", EMAIL, task_id="t-1", intent=INTENT, signals=SIGNALS)
        before = await approvals.get(lost.escalation_id, approver=ALICE)
        kept_before = await approvals.get(kept.escalation_id, approver=ALICE)
    await first.stop(grace=0)
    lose_rows(tmp_path / "escalations.db", lost.escalation_id)

    caplog.set_level(logging.WARNING, logger="sidecar.escalation.service")
    second = await running_sidecar(cfg)
    restored_lines = [r.getMessage() for r in caplog.records if "restored" in r.getMessage()]
    assert len(restored_lines) == 1 and lost.escalation_id in restored_lines[0]
    async with AsyncClient(second.addresses[0]) as agent, ApprovalsClient(second.addresses[0]) as approvals:
        listed = [e["escalation_id"] for e in await approvals.list(state="pending")]
        assert sorted(listed) == sorted([lost.escalation_id, kept.escalation_id])
        assert await approvals.get(kept.escalation_id, approver=ALICE) == kept_before  # untouched

        after = await approvals.get(lost.escalation_id, approver=ALICE)
        # everything the log holds is as it was: who, what, why, when, the trace, intent, signals, catalog
        for field in ("subject", "subject_source", "delegation", "tool", "server", "arguments_digest", "task_id",
                      "intent", "reasons", "policy_revision", "trace_id", "created_at", "expires_at", "signals",
                      "tool_catalog", "state"):
            assert after[field] == before[field], field
        assert after["intent"] == INTENT and after["signals"] == SIGNALS and after["state"] == PENDING
        # the arguments were never in the log: approvers get the digest and the reason
        assert before["arguments"] == EMAIL and after["arguments"] is None and after["arguments_preview"] is None
        assert after["arguments_withheld"].startswith("arguments_not_kept: ")
        assert "restored from the evidence log" in after["arguments_withheld"]

        # the agent asking again finds it; an approval of it lets exactly that call run, once
        again = await agent.authorize("send_email", EMAIL, task_id="t-1", intent=INTENT, signals=SIGNALS)
        assert again.outcome == "escalate" and again.escalation_id == lost.escalation_id
        await approvals.approve(lost.escalation_id, approver=ALICE)
        allowed = await agent.authorize("send_email", EMAIL, task_id="t-1", escalation_id=lost.escalation_id)
        assert allowed.outcome == "allow"
    await second.stop(grace=0)

    kinds = [r["kind"] for r in records_of(tmp_path / "evidence", lost.escalation_id) if r["kind"] != "decision"]
    assert kinds[0] == "escalation" and kinds.count("escalation") == 1 and "approval" in kinds
    assert verify_dir(tmp_path / "evidence").ok


async def test_a_lost_row_comes_back_as_the_log_last_saw_it_never_pending_again(config, running_sidecar, tmp_path):
    """The store was mended from the log's `escalation` records alone, so a row lost after it was decided
    (escalations.db deleted, emptied or put back from an older backup) came back pending: a denial was
    undone, and an approval already used could be approved again and the call run twice. Now each lost
    row comes back in the state of the newest record the log holds for it: denied by its approver, used by
    its decision, expired, or approved (usable once, within its use window); only an undecided one is pending."""
    cfg = config(**{"escalation.approvers": [ALICE, CFO]})
    first = await running_sidecar(cfg)
    async with AsyncClient(first.addresses[0]) as agent, ApprovalsClient(first.addresses[0]) as approvals:
        denied = (await agent.authorize("send_email", EMAIL, task_id="denied")).escalation_id
        used = (await agent.authorize("send_email", EMAIL, task_id="used")).escalation_id
        approved = (await agent.authorize("send_email", EMAIL, task_id="approved")).escalation_id
        undecided = (await agent.authorize("send_email", EMAIL, task_id="undecided")).escalation_id
        await approvals.deny(denied, approver=ALICE, note="not during the freeze")
        await approvals.approve(used, approver=ALICE)
        await approvals.approve(approved, approver=CFO, note="fine")
        ran = await agent.authorize("send_email", EMAIL, task_id="used", escalation_id=used)
        assert ran.outcome == "allow"
        before = {eid: await approvals.get(eid) for eid in (denied, used, approved, undecided)}
    await first.stop(grace=0)
    lose_rows(tmp_path / "escalations.db", denied, used, approved, undecided)

    second = await running_sidecar(cfg)
    async with AsyncClient(second.addresses[0]) as agent, ApprovalsClient(second.addresses[0]) as approvals:
        after = {eid: await approvals.get(eid) for eid in before}
        for eid, was in before.items():
            for field in ("state", "approver", "note", "decided_at", "subject", "tool", "task_id", "expires_at"):
                assert after[eid][field] == was[field], (was["task_id"], field)
        assert [e["escalation_id"] for e in await approvals.list(state="pending")] == [undecided]
        for eid in (denied, used):
            with pytest.raises(ApprovalsError) as info:
                await approvals.approve(eid, approver=CFO)
            assert info.value.code in ("already_decided", "approval_used"), info.value
        refused = await agent.authorize("send_email", EMAIL, task_id="denied", escalation_id=denied)
        assert refused.outcome == "deny" and refused.reasons[0].startswith("escalation_denied: "), refused.reasons
        assert "not during the freeze" in refused.reasons[0]
        again = await agent.authorize("send_email", EMAIL, task_id="used", escalation_id=used)
        assert again.outcome == "deny" and again.reasons[0].startswith("approval_used: "), again.reasons
        assert ran.decision_id in again.reasons[0]
        once = await agent.authorize("send_email", EMAIL, task_id="approved", escalation_id=approved)
        assert once.outcome == "allow", once.reasons
    await second.stop(grace=0)
    assert verify_dir(tmp_path / "evidence").ok


async def test_a_restart_that_lost_nothing_restores_nothing(config, running_sidecar, tmp_path, caplog):
    cfg = config()
    first = await running_sidecar(cfg)
    async with AsyncClient(first.addresses[0]) as agent, ApprovalsClient(first.addresses[0]) as approvals:
        escalated = await agent.authorize("send_email", EMAIL)
        await approvals.deny(escalated.escalation_id, approver=ALICE)
        denied = await approvals.get(escalated.escalation_id)
    await first.stop(grace=0)

    caplog.set_level(logging.WARNING, logger="sidecar.escalation.service")
    second = await running_sidecar(cfg)
    assert not [r for r in caplog.records if "restored" in r.getMessage()]
    async with ApprovalsClient(second.addresses[0]) as approvals:
        assert await approvals.get(escalated.escalation_id) == denied  # a denied one stays denied
        assert await approvals.list(state="pending") == []


async def test_an_escalation_lost_past_its_ttl_stays_unknown(config, running_sidecar, tmp_path):
    """Only the TTL's window is read back: an older escalation had expired anyway, and a retry
    that names it is refused, never allowed."""
    cfg = config(**{"escalation.ttl_seconds": 1})
    first = await running_sidecar(cfg)
    async with AsyncClient(first.addresses[0]) as agent:
        escalated = await agent.authorize("send_email", EMAIL)
    await first.stop(grace=0)
    lose_rows(tmp_path / "escalations.db", escalated.escalation_id)
    time.sleep(1.2)

    second = await running_sidecar(cfg)
    async with AsyncClient(second.addresses[0]) as agent, ApprovalsClient(second.addresses[0]) as approvals:
        with pytest.raises(ApprovalsError):
            await approvals.get(escalated.escalation_id)
        retry = await agent.authorize("send_email", EMAIL, escalation_id=escalated.escalation_id)
        assert retry.outcome == "deny" and retry.reasons[0].startswith("escalation_unknown: ")


async def test_restore_inserts_only_what_the_store_lacks(stores):  # noqa: F811
    store, other, _ = stores
    assert await store.latest_change() is None
    present = record("sha256:present")
    await store.create(present, NOW)
    assert await other.latest_change() == NOW

    missing = record("sha256:missing", now=NOW + 5)
    rival = record("sha256:present", now=NOW + 6)  # a second pending escalation of a stored fingerprint
    restored = await other.restore([present, missing, rival])
    assert restored == [missing]
    assert await store.get(missing.id) == missing and await store.get(rival.id) is None
    assert await store.latest_change() == NOW + 5
    assert await store.restore([missing]) == []


def test_reading_back_goes_newest_first_across_files_and_stops_at_since(tmp_path):
    directory = tmp_path / "evidence"
    evidence_log = EvidenceLog.open(directory, instance_id="t", rotate_bytes=4096)
    ids = []
    try:
        for n in range(40):
            escalation_id = new_escalation_id()
            ids.append(escalation_id)
            evidence_log.append_sync("escalation", {"escalation_id": escalation_id, "outcome": "escalate", "n": n})
        middle = time.time()
        time.sleep(0.01)
        for n in range(40, 60):
            escalation_id = new_escalation_id()
            ids.append(escalation_id)
            evidence_log.append_sync("escalation", {"escalation_id": escalation_id, "outcome": "escalate", "n": n})
    finally:
        evidence_log.close()
    assert len(list(directory.glob("evidence-*.jsonl"))) > 3  # the window spans several files

    everything = records_since(directory, 0, lambda line: b'"kind":"escalation"' in line)
    assert [r["escalation_id"] for r in everything] == ids[::-1]
    recent = records_since(directory, middle, lambda line: b'"kind":"escalation"' in line)
    assert [r["escalation_id"] for r in recent] == ids[40:][::-1]
    assert records_since(directory, time.time() + 60, lambda line: True) == []


def test_a_store_that_does_not_sync_new_escalations_needs_the_log_to_mend_it(tmp_path):
    with pytest.raises(ValueError, match="evidence_reader"):
        EscalationService(SqliteStore(tmp_path / "escalations.db", sync_new_escalations=False))


def test_reading_back_skips_lines_it_cannot_read(tmp_path):
    directory = tmp_path / "evidence"
    evidence_log = EvidenceLog.open(directory, instance_id="t")
    try:
        evidence_log.append_sync("escalation", {"escalation_id": "esc-a", "outcome": "escalate"})
    finally:
        evidence_log.close()
    path = sorted(directory.glob("evidence-*.jsonl"))[-1]
    good = path.read_bytes()
    garbage = b'{"kind":"escalation","logged_at":"not a time"}\n[1,2]\n{"logged_at":"2999-01-01T00:00:00Z", "kind":"escalation"\n'
    path.write_bytes(good + garbage)
    found = records_since(directory, 0, lambda line: b'"kind":"escalation"' in line)
    assert [r["escalation_id"] for r in found] == ["esc-a"]


class LogReader:
    """The evidence log in `directory`, read back as the recorder reads it (EvidenceReader)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def records_since(self, since, match):
        return records_since(self.directory, since, match)


@pytest.mark.parametrize("latest_offset, restored", [(10.0, True), (50.0, False)])
async def test_the_log_is_read_back_from_shortly_before_the_stores_newest_change(tmp_path, latest_offset, restored):
    """A row the store still has, changed `latest_offset` s after the lost escalation's record was
    logged: within RESTORE_MARGIN_SECONDS (30) of it the record is read back; past it, the store
    cannot have lost it (its later commit was synced), and the log is not read that far."""
    directory = tmp_path / "evidence"
    logged = time.time()
    store = SqliteStore(tmp_path / "escalations.db")
    writer = EscalationService(store, clock=lambda: logged)
    lost = record("sha256:lost", now=logged)
    evidence_log = EvidenceLog.open(directory, instance_id="t")
    try:
        evidence_log.append_sync(*writer.escalation_record(lost, "f" * 16))
    finally:
        evidence_log.close()
    await store.open()
    await store.create(record("sha256:kept", now=logged + latest_offset), logged + latest_offset)
    await store.aclose()
    reopened = SqliteStore(tmp_path / "escalations.db", sync_new_escalations=False)
    await reopened.open()  # the owner opens the store (the sidecar, before anything is written)
    service = EscalationService(reopened, evidence_reader=LogReader(directory),
                                sweep_interval_seconds=0, clock=lambda: logged + 100)
    try:
        async with service:
            found = await service.store.get(lost.id)
    finally:
        await reopened.aclose()
    assert (found is not None) == restored
    if restored:
        assert found.restored_at == logged + 100 and found.arguments is None and found.state == PENDING


@pytest.mark.parametrize("order", ["approval, use", "use, approval", "use alone"])
async def test_a_lost_used_approval_comes_back_used_whatever_the_log_holds_first(tmp_path, order):
    """A repeat that read the approval from the store can be logged before the approval's own record,
    and the approval's record can lie outside what is read back: the use alone makes the row `used`."""
    directory = tmp_path / "evidence"
    logged = float(int(time.time()))  # whole seconds: the times go through RFC 3339 in the records
    writer = EscalationService(SqliteStore(tmp_path / "writer.db"), clock=lambda: logged)
    lost = record("sha256:lost", now=logged)
    approved = replace(lost, state=APPROVED, approver=ALICE, note="checked", decided_at=logged + 1,
                       use_by=logged + 301)
    use = {"escalation_id": lost.id, "decision_id": "d-use", "outcome": "allow", "approver": ALICE,
           "time": rfc3339(logged + 2)}
    evidence_log = EvidenceLog.open(directory, instance_id="t")
    try:
        evidence_log.append_sync(*writer.escalation_record(lost, "f" * 16))
        for step in order.split(", "):
            if step == "approval":
                await EscalationEvidence(evidence_log, instance_id="t", clock=lambda: logged + 1).transition(
                    "approval", approved, outcome=APPROVED, reasons=[f"approved: by {ALICE}"])
            else:
                evidence_log.append_sync("decision", use)
    finally:
        evidence_log.close()
    store = SqliteStore(tmp_path / "escalations.db", sync_new_escalations=False)
    await store.open()
    service = EscalationService(store, evidence_reader=LogReader(directory), sweep_interval_seconds=0,
                                clock=lambda: logged + 100)
    try:
        async with service:
            found = await service.store.get(lost.id)
    finally:
        await store.aclose()
    assert (found.state, found.used_by_decision, found.used_at, found.approver) == (USED, "d-use", logged + 2, ALICE)
    if order != "use alone":
        assert (found.note, found.decided_at, found.use_by) == ("checked", logged + 1, logged + 301)


# Found by the redteam review: the reader took a record's time from the first `"logged_at":"…"` in its
# line, and an agent's own values come before the record's own field in canonical JSON (`input`, which
# holds the call's signals and arguments, sorts before `logged_at`). One call with signals
# {"logged_at": "2000-01-01T00:00:00Z"} made the reader stop there, so a host crash lost for good
# every escalation logged before that call. A far-future time made it read the whole log.
SPOOFS = [{"logged_at": "2000-01-01T00:00:00Z"}, {"kind": "decision", "logged_at": "2999-01-01T00:00:00Z"}]


@pytest.mark.parametrize("spoof", SPOOFS)
def test_reading_back_takes_each_records_own_time_not_one_an_agent_wrote(tmp_path, spoof):
    directory = tmp_path / "evidence"
    evidence_log = EvidenceLog.open(directory, instance_id="t")
    try:
        evidence_log.append_sync("escalation", {"escalation_id": "esc-old", "outcome": "escalate"})
        middle = time.time()
        time.sleep(0.01)
        evidence_log.append_sync("escalation", {"escalation_id": "esc-new", "outcome": "escalate"})
        evidence_log.append_sync("decision", {"outcome": "escalate", "input": {"signals": spoof}, "signals": spoof})
    finally:
        evidence_log.close()
    found = records_since(directory, 0, lambda line: b'"kind":"escalation"' in line)
    assert [r["escalation_id"] for r in found] == ["esc-new", "esc-old"]
    recent = records_since(directory, middle, lambda line: b'"kind":"escalation"' in line)
    assert [r["escalation_id"] for r in recent] == ["esc-new"]


async def test_an_agents_signals_cannot_keep_a_lost_escalation_from_coming_back(config, running_sidecar, tmp_path):
    cfg = config(**{"escalation.approvers": [ALICE, CFO]})
    first = await running_sidecar(cfg)
    async with AsyncClient(first.addresses[0]) as agent:
        lost = await agent.authorize("send_email", EMAIL, task_id="t-1", intent=INTENT, signals=SIGNALS)
        later = await agent.authorize("wire_money", {"amount": 1, "to": "acme"}, signals=SPOOFS[0])
        assert lost.outcome == later.outcome == "escalate"
    await first.stop(grace=0)
    lose_rows(tmp_path / "escalations.db", lost.escalation_id)

    second = await running_sidecar(cfg)
    async with ApprovalsClient(second.addresses[0]) as approvals:
        restored = await approvals.get(lost.escalation_id, approver=ALICE)
        assert restored["state"] == PENDING and restored["intent"] == INTENT and restored["signals"] == SIGNALS


async def test_release_gives_back_only_the_use_by_that_decision(stores):  # noqa: F811
    store, _, _ = stores
    approved = record("sha256:given-back")
    await store.create(approved, NOW)
    await decide(store, approved.id, "approved", approver="email:a@x", via="", note="", now=NOW + 1, use_by=NOW + 300)
    await store.consume(approved.id, approved.fingerprint, NOW + 2, "decision-1")
    assert await store.release(approved.id, "decision-2", NOW + 3) is None  # another decision's use stays
    released = await store.release(approved.id, "decision-1", NOW + 3)
    assert released.state == "approved" and released.used_at is None and released.used_by_decision == ""
    assert released.updated_at == NOW + 3 and released.approver == "email:a@x" and released.use_by == NOW + 300
    assert await store.release(approved.id, "decision-1", NOW + 4) is None  # once
    assert (await store.consume(approved.id, approved.fingerprint, NOW + 5, "decision-3")).used_by_decision == "decision-3"


async def test_a_killed_sidecar_loses_no_new_escalation(tmp_path):
    """SIGKILL right after an escalation: its unsynced commit was in the kernel's hands, so the
    restarted sidecar has the row as it was, arguments included, and restores nothing."""
    policy = write_policy(tmp_path / "rego", ESCALATION_POLICY, data=ESCALATION_DATA)
    socket_path = tmp_path / "s" / "sidecar.sock"
    config = tmp_path / "sidecar.yaml"
    config.write_text(textwrap.dedent(f"""
        listen: {{tcp: "", unix: "{socket_path}"}}
        policy: {{dir: "{policy}", reload: false}}
        sidecar: {{instance_id: kill-test}}
        evidence: {{dir: "{tmp_path / 'ev'}"}}
        telemetry: {{exporter: none}}
        identity: {{sources: [dev]}}
        escalation: {{approvers: ["{ALICE}"]}}
    """))
    sidecar = serving_sidecar(config)
    try:
        async with AsyncClient(f"unix:{socket_path}") as agent:
            escalated = await agent.authorize("send_email", EMAIL, task_id="t-1", intent=INTENT)
        sidecar.send_signal(signal.SIGKILL)
        sidecar.wait(15)
        restarted_at = len(sidecar.text())
        sidecar.start()
        sidecar.wait_serving()
        async with ApprovalsClient(f"unix:{socket_path}") as approvals:
            kept = await approvals.get(escalated.escalation_id, approver=ALICE)
    finally:
        sidecar.close()
    second_run = sidecar.text()[restarted_at:]
    assert kept["state"] == "pending" and kept["arguments"] == EMAIL and kept["intent"] == INTENT
    assert kept["arguments_preview"]["api_token"] == "[REDACTED]" and kept["arguments_withheld"] == ""
    assert "serving" in second_run and "restored" not in second_run
