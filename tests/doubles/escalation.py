"""TEST HELPERS for the escalation and console tests: a policy that escalates, configs, evidence.

Not production code. The policy is the shipped combinator's shape in one
file (deny beats escalate, an approval satisfies escalate, never deny), so
these tests do not move when the shipped rego/ library changes:

    rm_rf                              deny
    send_email, delete_repo            escalate; any approval satisfies it
    wire_money                         escalate; only an approver in data.finance_approvers satisfies it
    search_docs                        allow

The catalog (data.sidecar.catalog) describes send_email and delete_repo, so
approvers' views carry a description, owner, risk and reversibility; the
other tools are not in it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from sidecar.config import Config, load_config
from tests.conftest import LOADED_MACHINE, write_policy

ESCALATION_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    escalating_tools := {"send_email", "wire_money", "delete_repo"}
    allowed_tools := {"send_email", "wire_money", "delete_repo", "search_docs"}

    deny contains "blocked_tool: this tool is never allowed" if input.tool.name == "rm_rf"

    escalate contains "high_risk_tool: a human approves this tool" if escalating_tools[input.tool.name]

    allow contains "listed: the tool is in the test catalog" if allowed_tools[input.tool.name]

    approval_given if {
        is_string(input.approval.escalation_id)
        input.approval.escalation_id != ""
        is_string(input.approval.approver)
        input.approval.approver != ""
    }

    approved if {
        approval_given
        input.tool.name != "wire_money"
    }

    # Policy sees the approver and may require more: wire_money needs finance.
    approved if {
        approval_given
        input.tool.name == "wire_money"
        input.approval.approver in data.finance_approvers
    }

    approval_reasons contains sprintf("approved: escalation %v approved by %v", [
        input.approval.escalation_id, input.approval.approver]) if approved

    decision := {"outcome": "deny", "reasons": sort(deny), "obligations": {}} if {
        count(deny) > 0
    } else := {"outcome": "escalate", "reasons": sort(escalate), "obligations": {}} if {
        count(escalate) > 0
        not approved
    } else := {"outcome": "allow", "reasons": sort(allow | approval_reasons), "obligations": {}} if {
        count(allow) > 0
    }
"""

ESCALATION_DATA = """\
    finance_approvers:
      - email:cfo@example.org
    sidecar:
      catalog:
        tools:
          send_email:
            risk: high
            reversible: false
            owner: communications
            description: Send an email on behalf of the organisation.
            server: mail
          delete_repo:
            risk: critical
            reversible: false
            owner: developer-experience
            description: Delete a source repository and its history.
"""

AGENT = "spiffe://dev.local/agent"
ALICE = "email:alice@example.org"
BOB = "email:bob@example.org"
CFO = "email:cfo@example.org"

STORES = ["sqlite", "postgres"]


def policy_dir(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "escalation-policy", ESCALATION_POLICY, data=ESCALATION_DATA)


async def decide(store: Any, escalation_id: str, state: str, *, now: float, use_by: float | None = None,
                 approver: str = "a:b", via: str = "", note: str = "") -> Any:
    """A human decision made as the service makes it (claim, then decide), for the store tests; None
    when either finds the escalation not decidable. Its evidence record is the service's, not here."""
    token = secrets.token_hex(8)
    if await store.claim(escalation_id, token, now) is None:
        return None
    return await store.decide(escalation_id, token, state, approver=approver, via=via, note=note, now=now,
                              use_by=use_by)


def store_settings(kind: str, tmp_path: Path) -> dict[str, Any]:
    if kind == "postgres":
        from tests.doubles.postgres import PostgresServer

        return {"escalation.store": "postgres", "escalation.dsn": PostgresServer.shared().new_database()}
    return {"escalation.store": "sqlite", "escalation.path": str(tmp_path / "escalations.db")}


def make_config(tmp_path: Path, store: dict[str, Any] | None = None, **overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "listen.tcp": "127.0.0.1:0",
        "listen.unix": "",
        "policy.dir": str(policy_dir(tmp_path)),
        "policy.reload": False,
        **LOADED_MACHINE,  # an escalation test needs its calls escalated, not timed out or shed
        "sidecar.instance_id": "escalation-test",
        "evidence.dir": str(tmp_path / "evidence"),
        "telemetry.exporter": "none",
        "escalation.sweep_interval_seconds": 0.1,
        "escalation.poll_interval_ms": 100,
        "identity.sources": ["dev"],  # dev mode on purpose: the default is workload_api
    }
    settings.update(store or store_settings("sqlite", tmp_path))
    settings.update(overrides)
    return load_config(None, settings)


def records(evidence_dir: Path) -> list[dict]:
    out = []
    for path in sorted(Path(evidence_dir).glob("evidence-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def records_of(evidence_dir: Path, escalation_id: str) -> list[dict]:
    return [r for r in records(evidence_dir) if r.get("escalation_id") == escalation_id]


@pytest.fixture(params=STORES)
def store_kind(request) -> str:
    return request.param


async def until_pending(approvals: Any, agent: "asyncio.Future | None" = None, *, tool: str = "",
                        timeout: float = 60.0) -> list[dict]:
    """The pending escalations (of `tool`, or all) once there are any: an agent escalates in the
    background (a thread or task), and on a loaded machine it may take seconds to get there.

    Polls until then; no fixed sleep decides. When `agent` (the background call) ends first, its own
    error is raised (e.g. AuthorizationDenied with the reason the call was not escalated); after
    `timeout` seconds an AssertionError says nothing escalated.
    """
    deadline = time.monotonic() + timeout
    while True:
        pending = await approvals.list(state="pending", tool=tool)
        if pending:
            return pending
        if agent is not None and agent.done():
            agent.result()  # the agent's own error, if it failed
            raise AssertionError(f"the agent finished without escalating (it returned {agent.result()!r})")
        if time.monotonic() > deadline:
            raise AssertionError(f"no pending escalation{f' of {tool}' if tool else ''} after {timeout:.0f} s")
        await asyncio.sleep(0.05)


def documented_webhook_verifier() -> tuple[Callable[..., None], type[Exception]]:
    """`verify_webhook` and `WebhookRefused` exactly as docs/escalation.md gives them to receivers: notices
    are checked by the documented check itself, never by a copy of the sender's code."""
    from tests.test_docs_examples import ALL

    (block,) = [b for b in ALL if b.kind == "python" and "def verify_webhook(" in b.text]
    namespace: dict[str, Any] = {}
    exec(compile(block.text, block.where, "exec"), namespace)
    return namespace["verify_webhook"], namespace["WebhookRefused"]
