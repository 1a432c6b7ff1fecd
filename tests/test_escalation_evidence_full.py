"""Approvals while the evidence volume fills: none takes effect without its record.

Two ways a human decision took effect with no record of it, or was spent on one the log lacks:

- an approval given when the disk had just filled (the recorder still healthy: nothing had
  failed yet) was committed in the store, its `approval` record failed and was only logged, and
  the approver heard "approved": the call could then run on an approval the log never held;
- the approved retry was allowed and consumed the approval, its decision record failed, and the
  agent heard deny (evidence_unavailable), yet the approval stayed `used` by that unrecorded
  decision: the approval was spent, the repeat got `approval_used` naming a decision missing from
  the chain.

Now an approval that cannot be recorded is refused (evidence_unavailable) and not made: the
escalation stays pending, to be approved once the disk has room (test_escalation_record_first.py
races its record); an approval whose allow could not be recorded is given back. Real sidecar, evidence on a real
full tmpfs, the store off it, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import pytest

from sidecar.client import AsyncClient
from sidecar.escalation.client import ApprovalsClient, ApprovalsError
from sidecar.evidence.verify import verify_dir
from tests.doubles.escalation import (  # noqa: F401  (store_kind is a fixture)
    ALICE,
    make_config,
    records,
    records_of,
    store_kind,
    store_settings,
)

EMAIL = {"to": "cfo@example.com", "body": "Q3"}


@pytest.fixture
async def full_disk_sidecar(tmp_path, tiny_volume, running_sidecar, store_kind):
    directory = tiny_volume.path / "ev"
    config = make_config(tmp_path, store_settings(store_kind, tmp_path), **{
        "evidence.dir": str(directory),
        "evidence.checkpoint_mirror": str(tmp_path / "cp.jsonl"),
    })
    sidecar = await running_sidecar(config)
    return sidecar.addresses[0], directory


async def test_an_approval_that_cannot_be_recorded_is_refused_and_stays_pending(full_disk_sidecar, tiny_volume):
    address, directory = full_disk_sidecar
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        escalated = await agent.authorize("send_email", EMAIL, task_id="t-1")
        assert escalated.outcome == "escalate"
        tiny_volume.fill()
        with pytest.raises(ApprovalsError) as info:
            await approvals.approve(escalated.escalation_id, note="n" * 1900, approver=ALICE)
        assert info.value.message.startswith("evidence_unavailable: ") and "still pending" in info.value.message
        tiny_volume.free()
        assert (await approvals.get(escalated.escalation_id))["state"] == "pending"
        retry = await agent.authorize("send_email", EMAIL, task_id="t-1", escalation_id=escalated.escalation_id)
        # the approval that was not made carries out nothing: the call is still escalated
        assert (retry.outcome, retry.escalation_id) == ("escalate", escalated.escalation_id), retry.reasons
        assert not [r for r in records(directory) if r["kind"] == "decision" and r["outcome"] == "allow"]
        assert ("approval", escalated.escalation_id) not in [(r["kind"], r.get("escalation_id"))
                                                             for r in records(directory)]
        approved = await approvals.approve(escalated.escalation_id, note="again", approver=ALICE)
        assert approved["state"] == "approved"
        allowed = await agent.authorize("send_email", EMAIL, task_id="t-1", escalation_id=escalated.escalation_id)
        assert allowed.outcome == "allow", allowed.reasons
    assert [r["note"] for r in records(directory) if r["kind"] == "approval"] == ["again"]
    assert verify_dir(directory).ok


async def test_an_approval_spent_on_an_unrecorded_allow_is_given_back(full_disk_sidecar, tiny_volume):
    address, directory = full_disk_sidecar
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        escalated = await agent.authorize("send_email", EMAIL, task_id="t-2")
        await approvals.approve(escalated.escalation_id, note="ok", approver=ALICE)
        tiny_volume.fill()
        # an intent of 4 KiB: the record needs a new block, whatever room the file's last page has
        lost = await agent.authorize("send_email", EMAIL, task_id="t-2", intent="x" * 4096,
                                     escalation_id=escalated.escalation_id)
        assert lost.outcome == "deny" and lost.reasons[0].startswith("evidence_unavailable"), lost.reasons
        tiny_volume.free()
        state = await approvals.get(escalated.escalation_id)
        assert state["state"] == "approved", state
        again = await agent.authorize("send_email", EMAIL, task_id="t-2", escalation_id=escalated.escalation_id)
        assert again.outcome == "allow", again.reasons
        once = await agent.authorize("send_email", EMAIL, task_id="t-2", escalation_id=escalated.escalation_id)
        assert once.outcome == "deny" and once.reasons[0].startswith("approval_used")
        assert again.decision_id in once.reasons[0]  # used by the decision the log holds
    logged = {r.get("decision_id") for r in records(directory)}
    assert lost.decision_id not in logged and again.decision_id in logged
    assert verify_dir(directory).ok


async def test_an_approval_used_by_an_allow_that_cannot_be_recorded_holds_again(tmp_path, tiny_volume, running_sidecar):
    """The disk is really full (a 256 KiB tmpfs) when the approved call comes back: its allow cannot
    be recorded, so it is denied and the tool does not run; the approval it used is given back, and
    the same call runs once the disk has room, once."""
    cfg = make_config(tmp_path, store_settings("sqlite", tmp_path), **{
        "evidence.dir": str(tiny_volume.path / "evidence"),
        "evidence.checkpoint_mirror": str(tmp_path / "checkpoints.jsonl"),
    })
    sidecar = await running_sidecar(cfg)
    async with AsyncClient(sidecar.addresses[0]) as agent, ApprovalsClient(sidecar.addresses[0]) as approvals:
        escalated = await agent.authorize("send_email", EMAIL, task_id="t-1")
        await approvals.approve(escalated.escalation_id, approver=ALICE)

        tiny_volume.fill()
        # an intent of a page: its record needs a new block of the volume, whatever room the last page has
        refused = await agent.authorize("send_email", EMAIL, task_id="t-1", intent="x" * 4096,
                                        escalation_id=escalated.escalation_id)
        assert refused.outcome == "deny" and refused.reasons[0].startswith("evidence_unavailable: ")
        given_back = await approvals.get(escalated.escalation_id)
        assert given_back["state"] == "approved" and given_back["approver"] == ALICE

        tiny_volume.free()
        allowed = await agent.authorize("send_email", EMAIL, task_id="t-1", escalation_id=escalated.escalation_id)
        assert allowed.outcome == "allow"
        again = await agent.authorize("send_email", EMAIL, task_id="t-1", escalation_id=escalated.escalation_id)
        assert again.outcome == "deny" and again.reasons[0].startswith("approval_used: ")
        assert allowed.decision_id in again.reasons[0]

    allows = [r for r in records_of(tiny_volume.path / "evidence", escalated.escalation_id)
              if r["kind"] == "decision" and r["outcome"] == "allow"]
    assert [r["decision_id"] for r in allows] == [allowed.decision_id]
    assert refused.decision_id not in {r.get("decision_id") for r in records_of(tiny_volume.path / "evidence",
                                                                                   escalated.escalation_id)}
