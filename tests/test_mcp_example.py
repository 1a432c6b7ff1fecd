"""README's MCP walk-through runs: examples/mcp.yaml with the shipped policy and the example MCP servers."""

from __future__ import annotations

import json

from mcp.client.client import Client

from sidecar.config import load_config
from sidecar.escalation.client import ApprovalsClient
from tests.conftest import REPO


async def test_the_readme_mcp_walk_through(tmp_path, monkeypatch, running_sidecar):
    monkeypatch.chdir(REPO)  # the example's commands are relative to the repository
    config = load_config(REPO / "examples" / "mcp.yaml", {
        "listen.tcp": "127.0.0.1:0", "listen.unix": "", "mcp.listen": "127.0.0.1:0",
        "evidence.dir": str(tmp_path / "evidence"), "telemetry.exporter": "none", "policy.reload": False,
    })
    sidecar = await running_sidecar(config)
    email = {"to": ["cfo@example.com"], "subject": "Q3", "body": "numbers"}
    async with Client(sidecar.mcp.url) as agent, ApprovalsClient(sidecar.addresses[0]) as approvals:
        assert [t.name for t in (await agent.list_tools()).tools] == ["docs__search_docs", "mail__send_email"]
        found = await agent.call_tool("docs__search_docs", {"query": "rotation"})
        assert not found.is_error and "rotation" in found.content[0].text
        denied = await agent.call_tool("docs__run_shell", {"command": "id"})
        assert denied.content[0].text.startswith("denied by policy") and "tool_not_in_catalog" in denied.content[0].text
        mail = await agent.call_tool("mail__send_email", email)
        assert mail.content[0].text.startswith("needs approval: escalation esc-")
        await approvals.approve(mail.meta["sidecar/escalation_id"], approver="email:alice@example.org")
        sent = await agent.call_tool("mail__send_email", email)
        assert not sent.is_error and sent.content[0].text == "queued for cfo@example.com"
    lines = (tmp_path / "evidence" / "evidence-000001.jsonl").read_text().splitlines()
    invocations = [r for r in map(json.loads, lines) if r["kind"] == "invocation"]
    assert [(r["tool"], r["autonomy"], r["rollback_token"]) for r in invocations] == [
        ("search_docs", "autonomous", ""), ("send_email", "human_approved", "recall-msg-0001")]
