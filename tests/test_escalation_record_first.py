"""A human decision takes effect only once its evidence record is durable.

The red-team gap: Approve set the store's state to `approved`, then wrote the `approval`
record. A retry racing the record could use the approval and have its allow recorded; if the
approval's record then failed, a call had run on an approval the log lacked, and the approver
heard it had failed. Now the decision is claimed (the escalation stays `pending`), recorded,
and only then decided (service.EscalationService._decide): a retry meanwhile is escalated again
under the same id and runs nothing, and a record that fails leaves the escalation pending, to be
decided again.

The race is forced: the real sidecar's evidence recorder holds the `approval` record (it is
written only when the test lets it) while the agent retries, on SQLite, PostgreSQL, and two
sidecars sharing PostgreSQL (the retry on the other one). The failure is a real full disk, and
a recorder that refuses the record.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.client import AsyncClient
from sidecar.escalation.client import ApprovalsClient, ApprovalsError
from sidecar.evidence import EvidenceError
from sidecar.evidence.verify import verify_dir
from tests.doubles.escalation import ALICE, CFO, make_config, records, records_of, store_settings

EMAIL = {"to": "cfo@example.com", "body": "Q3"}


def hold(monkeypatch: pytest.MonkeyPatch, recorder, kind: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the sidecar's records of `kind` until `release` is set; `held` is set when one is waiting."""
    held, release = asyncio.Event(), asyncio.Event()
    append = recorder.append

    async def held_append(record_kind, fields, *args, **kwargs):
        if record_kind == kind:
            held.set()
            await release.wait()
        return await append(record_kind, fields, *args, **kwargs)

    monkeypatch.setattr(recorder, "append", held_append)
    return held, release


@pytest.mark.parametrize("where", ["sqlite", "postgres", "postgres-two-sidecars"])
async def test_a_retry_racing_the_approvals_record_cannot_use_it(tmp_path, running_sidecar, monkeypatch, where):
    store = store_settings("sqlite" if where == "sqlite" else "postgres", tmp_path)
    deciding = await running_sidecar(make_config(tmp_path, store))
    retrying = deciding
    if where == "postgres-two-sidecars":
        retrying = await running_sidecar(make_config(tmp_path, store, **{
            "evidence.dir": str(tmp_path / "evidence-b"), "sidecar.instance_id": "escalation-test-b"}))
    held, release = hold(monkeypatch, deciding.recorder, "approval")
    async with AsyncClient(retrying.addresses[0]) as agent, ApprovalsClient(deciding.addresses[0]) as approvals:
        escalated = await agent.authorize("send_email", EMAIL, task_id="t-1")
        assert escalated.outcome == "escalate"
        approving = asyncio.create_task(approvals.approve(escalated.escalation_id, note="ok", approver=ALICE))
        await asyncio.wait_for(held.wait(), 30)

        # the approval's record is not written yet: the retry cannot use it, nor can anyone else decide
        raced = await agent.authorize("send_email", EMAIL, task_id="t-1", escalation_id=escalated.escalation_id)
        assert (raced.outcome, raced.escalation_id) == ("escalate", escalated.escalation_id), raced.reasons
        assert (await approvals.get(escalated.escalation_id))["state"] == "pending"
        with pytest.raises(ApprovalsError) as other:
            await approvals.deny(escalated.escalation_id, note="no", approver=CFO)
        assert other.value.message.startswith("already_decided: ") and "being decided" in other.value.message

        release.set()
        approved = await asyncio.wait_for(approving, 30)
        assert approved["state"] == "approved" and approved["approver"] == ALICE
        allowed = await agent.authorize("send_email", EMAIL, task_id="t-1", escalation_id=escalated.escalation_id)
        assert allowed.outcome == "allow", allowed.reasons

    decisions = [r for r in records(tmp_path / ("evidence-b" if retrying is not deciding else "evidence"))
                 if r.get("escalation_id") == escalated.escalation_id and r["kind"] == "decision"]
    assert [r["outcome"] for r in decisions] == ["escalate", "escalate", "allow"]
    assert decisions[-1]["decision_id"] == allowed.decision_id
    logged = [r["kind"] for r in records_of(tmp_path / "evidence", escalated.escalation_id)]
    assert logged.count("approval") == 1
    assert verify_dir(tmp_path / "evidence").ok


@pytest.mark.parametrize("kind", ["approval", "human_denial"])
async def test_a_decision_whose_record_is_refused_leaves_the_escalation_pending(tmp_path, running_sidecar,
                                                                                 monkeypatch, kind):
    sidecar = await running_sidecar(make_config(tmp_path))
    append = sidecar.recorder.append

    async def refusing(record_kind, fields, *args, **kwargs):
        if record_kind == kind:
            raise EvidenceError("the evidence log is unavailable (test)")
        return await append(record_kind, fields, *args, **kwargs)

    monkeypatch.setattr(sidecar.recorder, "append", refusing)
    async with AsyncClient(sidecar.addresses[0]) as agent, ApprovalsClient(sidecar.addresses[0]) as approvals:
        escalated = await agent.authorize("send_email", EMAIL, task_id="t-2")
        decide = approvals.approve if kind == "approval" else approvals.deny
        with pytest.raises(ApprovalsError) as info:
            await decide(escalated.escalation_id, note="n", approver=ALICE)
        assert info.value.message.startswith("evidence_unavailable: ") and "still pending" in info.value.message
        state = await approvals.get(escalated.escalation_id, approver=ALICE)
        assert state["state"] == "pending" and not state["approver"] and state["arguments"] == EMAIL
        retry = await agent.authorize("send_email", EMAIL, task_id="t-2", escalation_id=escalated.escalation_id)
        assert (retry.outcome, retry.escalation_id) == ("escalate", escalated.escalation_id), retry.reasons

        monkeypatch.setattr(sidecar.recorder, "append", append)  # the log works again: decided as usual
        decided = await decide(escalated.escalation_id, note="n", approver=ALICE)
        assert decided["state"] == ("approved" if kind == "approval" else "denied")
    assert [r["kind"] for r in records_of(tmp_path / "evidence", escalated.escalation_id)].count(kind) == 1
    assert not [r for r in records(tmp_path / "evidence") if r["kind"] == "decision" and r["outcome"] == "allow"]
