"""MCP elicitation for escalated calls, end to end: a real MCP client from the SDK with an
elicitation callback → the sidecar's gateway → a real MCP server built with the SDK, with real
OPA, escalations, the Approvals gRPC service and the evidence log.

Each flow runs on both protocol eras the SDK speaks: `auto` negotiates 2026-07-28 (the question
comes back as `InputRequiredResult` and the client repeats the call with the answer), `legacy`
the initialize handshake (the question is an `elicitation/create` request during the call).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp.client.client import Client

from sidecar.escalation.client import ApprovalsClient
from sidecar.evidence.verify import verify_dir
from tests.conftest import write_policy
from tests.test_mcp_gateway import ALICE, POLICY, docs_upstream, evidence  # noqa: F401 (fixture)

MODES = ["auto", "legacy"]  # 2026-07-28 (InputRequiredResult) and the initialize handshake (elicitation/create)
CALL = {"to": ["cfo@example.com"], "body": "Q3"}
ESCALATION_ID = re.compile(r"esc-[A-Za-z0-9_-]+")


@dataclass
class User:
    """The agent's user behind the elicitation callback: answers `action` (with `content`) and notes each question."""

    action: str = "accept"
    content: dict[str, Any] | None = None
    questions: list[types.ElicitRequestParams] = field(default_factory=list)
    asked: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.questions.append(params)
        self.asked.set()
        return types.ElicitResult(action=self.action, content=self.content)

    @property
    def escalation_id(self) -> str:
        match = ESCALATION_ID.search(self.questions[-1].message)
        assert match, self.questions[-1].message
        return match.group(0)


def gateway_config(tmp_path, sidecar_config, upstream_url: str, wait_seconds: float):
    return sidecar_config(**{
        "policy.dir": str(write_policy(tmp_path / "policy", POLICY)),
        "listen.unix": "",
        "mcp.listen": "127.0.0.1:0",
        "mcp.elicitation_wait_seconds": wait_seconds,
        "mcp.upstreams": {"docs": {"url": upstream_url, "timeout_seconds": 4}},
    })


@pytest.fixture
def start_gateway(tmp_path, sidecar_config, running_sidecar, docs_upstream):  # noqa: F811
    upstream, seen = docs_upstream

    async def start(wait_seconds: float = 30):
        config = gateway_config(tmp_path, sidecar_config, upstream.url, wait_seconds)
        return await running_sidecar(config), seen, config

    return start


async def until_waiting(approvals: ApprovalsClient, user: User) -> str:
    """The escalation id, once the gateway waits on it (so the decision lands during the wait)."""
    await user.asked.wait()
    escalation_id = user.escalation_id
    for _ in range(1000):
        if (await approvals.get(escalation_id))["agent_waiting"]:
            return escalation_id
        await asyncio.sleep(0.01)
    raise AssertionError(f"the gateway never waited on {escalation_id}")


@pytest.mark.parametrize("mode", MODES)
async def test_accept_then_approver_approves_runs_the_call_once_in_the_same_call(start_gateway, mode):
    sidecar, seen, config = await start_gateway()
    user = User()
    async with Client(sidecar.mcp.url, elicitation_callback=user, mode=mode) as agent, \
            ApprovalsClient(sidecar.addresses[0]) as approvals:
        call = asyncio.create_task(agent.call_tool("docs__send", CALL))
        escalation_id = await until_waiting(approvals, user)
        assert not seen.calls
        await approvals.approve(escalation_id, note="fine", approver=ALICE)
        result = await call
        assert not result.is_error, result
        assert result.content[0].text == "sent to 1"
        assert result.meta["sidecar/outcome"] == "allow" and result.meta["sidecar/escalation_id"] == escalation_id
        assert seen.calls == [("send", CALL)]
        assert (await approvals.get(escalation_id))["state"] == "used"
    assert len(user.questions) == 1
    records = evidence(Path(config.evidence.dir))
    kinds = [r["kind"] for r in records]
    assert kinds.count("escalation") == 1 and kinds.count("approval") == 1 and kinds.count("invocation") == 1
    escalating = next(r for r in records if r["kind"] == "decision" and r["outcome"] == "escalate")
    allowed = next(r for r in records if r["kind"] == "decision" and r["outcome"] == "allow")
    assert escalating["escalation_id"] == allowed["escalation_id"] == escalation_id
    invocation = next(r for r in records if r["kind"] == "invocation")
    assert invocation["decision_id"] == allowed["decision_id"] and invocation["decision_hash"] == allowed["hash"]
    assert invocation["autonomy"] == "human_approved" and invocation["approver"] == ALICE
    assert invocation["escalation_id"] == escalation_id
    assert verify_dir(Path(config.evidence.dir)).ok
