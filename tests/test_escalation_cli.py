"""`agent-sidecar approvals list | show | approve | deny` as a person runs them, against a real sidecar."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

from sidecar.client import AsyncClient
from tests.conftest import REPO
from tests.doubles.escalation import ALICE, BOB, make_config

CLI = [sys.executable, "-m", "sidecar"]


async def run(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def test_list_show_approve_deny(tmp_path, running_sidecar):
    sidecar = await running_sidecar(make_config(tmp_path))
    address = sidecar.addresses[0]
    async with AsyncClient(address) as agent:
        email = await agent.authorize("send_email", {"to": "cfo@example.com", "body": "hi", "token": "xyz"},
                                      task_id="t-1", intent="Send the Q3 numbers to the CFO",
                                      signals={"risk_score": 0.7, "model": "test-model"})
        repo = await agent.authorize("delete_repo", {"repo": "acme/old"})

    code, out, err = await run("approvals", "list", "--address", address)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATE", "AGE", "EXPIRES", "AGENT", "SUBJECT", "TOOL", "APPROVER", "REASONS"]
    assert [row.split()[0] for row in rows] == [repo.escalation_id, email.escalation_id]  # newest first
    assert all("pending" in row and "spiffe://dev.local/agent" in row and "high_risk_tool" in row for row in rows)
    assert all(" idle " in row for row in rows)  # nobody awaits these decisions

    # the dev identity is the agent's own: it may not decide, so it reads the redacted preview
    code, out, err = await run("approvals", "show", email.escalation_id, "--address", address)
    assert code == 0, err
    assert f"escalation   {email.escalation_id}" in out and "tool         send_email" in out
    assert '"token": "[REDACTED]"' in out and "xyz" not in out and "task         t-1" in out
    assert "  withheld   self_approval: spiffe://dev.local/agent cannot decide" in out
    assert "description  Send an email on behalf of the organisation." in out
    assert "owner        communications" in out and "risk         high" in out
    assert "reversible   no (cannot be undone)" in out
    assert "intent       Send the Q3 numbers to the CFO" in out
    assert "agent        not waiting (last asked" in out
    assert '"risk_score": 0.7' in out and '"model": "test-model"' in out

    # an approver who may decide reads the arguments in full, as the tool will receive them
    code, out, err = await run("approvals", "show", email.escalation_id, "--address", address, "--approver", ALICE)
    assert code == 0, err
    assert "in full, exactly as the tool will receive them:" in out and '"token": "xyz"' in out
    assert "  kept out of the evidence log: token" in out
    code, out, err = await run("approvals", "show", email.escalation_id, "--address", address, "--approver", ALICE,
                               "--json")
    shown = json.loads(out)
    assert shown["arguments"] == {"to": "cfo@example.com", "body": "hi", "token": "xyz"}
    assert shown["arguments_withheld"] == "" and shown["intent"] == "Send the Q3 numbers to the CFO"
    assert shown["signals"] == {"risk_score": 0.7, "model": "test-model"}
    assert shown["tool_catalog"]["owner"] == "communications" and shown["tool_catalog"]["reversible"] is False
    assert shown["agent_waiting"] is False and shown["agent_seen_at"].endswith("Z")
    code, out, err = await run("approvals", "list", "--address", address, "--approver", ALICE, "--json")
    assert [json.loads(line)["arguments"] for line in out.splitlines()] == [
        {"repo": "acme/old"}, {"to": "cfo@example.com", "body": "hi", "token": "xyz"}]

    code, out, err = await run("approvals", "approve", email.escalation_id, "--note", "fine by me",
                               "--approver", ALICE, env={"AGENT_SIDECAR_ADDRESS": address})
    assert code == 0, err
    assert out.startswith(f"approved {email.escalation_id} (send_email for spiffe://dev.local/agent) as {ALICE}")
    assert "through the MCP gateway: the same call, which the gateway matches to it" in out  # MCP agents send no id

    code, out, err = await run("approvals", "deny", repo.escalation_id, "--note", "no", "--approver", BOB,
                               "--address", address, "--json")
    assert code == 0, err
    denied = json.loads(out)
    assert (denied["state"], denied["approver"], denied["note"]) == ("denied", BOB, "no")

    code, out, err = await run("approvals", "list", "--state", "all", "--address", address, "--json")
    states = {json.loads(line)["escalation_id"]: json.loads(line)["state"] for line in out.splitlines()}
    assert states == {email.escalation_id: "approved", repo.escalation_id: "denied"}
    code, out, err = await run("approvals", "list", "--address", address)
    assert (code, out.strip()) == (0, "no escalations")
    # decided: the unredacted arguments are gone from the store, and say so
    code, out, err = await run("approvals", "show", email.escalation_id, "--address", address, "--approver", BOB,
                               "--json")
    shown = json.loads(out)
    assert shown["arguments"] is None and shown["arguments_withheld"].startswith("arguments_not_kept:")
    assert "xyz" not in "".join(p.read_text() for p in (tmp_path / "evidence").glob("evidence-*.jsonl"))


async def test_refusals_and_unreachable_sidecars_exit_nonzero_with_the_reason(tmp_path, running_sidecar):
    sidecar = await running_sidecar(make_config(tmp_path))
    address = sidecar.addresses[0]
    async with AsyncClient(address) as agent:
        escalated = await agent.authorize("send_email", {"to": "x@example.com", "body": "b"})

    code, out, err = await run("approvals", "approve", escalated.escalation_id, "--address", address)
    assert code == 1
    assert err.startswith("agent-sidecar: refused: self_approval: spiffe://dev.local/agent cannot approve")
    assert "name the person deciding with --approver" in err  # the refusal names its fix
    code, out, err = await run("approvals", "show", "esc-" + "0" * 32, "--address", address)
    assert code == 1 and "escalation_unknown" in err
    code, out, err = await run("approvals", "list", "--address", "127.0.0.1:1", "--timeout", "2")
    assert code == 2 and "cannot reach the sidecar at 127.0.0.1:1" in err
    code, out, err = await run("approvals", "list", "--address", address, "--state", "bogus")
    assert code == 2 and "invalid choice" in err


async def test_a_token_never_goes_in_clear_off_the_pod(tmp_path):
    """The approvals commands speak plaintext gRPC: with --token-file, an address off the pod is refused
    before anything is sent (exit 2); the unix socket and loopback are where a token may go (here nobody
    answers, so the error is the connection's)."""
    token = tmp_path / "token"
    token.write_text("jwt-svid-must-stay-here")
    for address in ("10.0.0.5:50051", "agent-sidecars.agents.svc:50051", "[::ffff:127.0.0.1]:50051",
                    "127.0.0.1.evil.example:50051", "dns:///agent-sidecars.agents.svc:50051", "0.0.0.0:50051"):
        code, out, err = await run("approvals", "list", "--address", address, "--token-file", str(token))
        assert (code, out) == (2, ""), (address, err)
        assert err.startswith(f"agent-sidecar: --token-file: the JWT-SVID would go in clear over plaintext gRPC to "
                              f"{address!r} (this client speaks no TLS"), err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    for address in (f"127.0.0.1:{closed}", f"localhost:{closed}", f"unix:{tmp_path / 'none.sock'}"):
        code, out, err = await run("approvals", "list", "--address", address, "--token-file", str(token),
                                   "--timeout", "2")
        assert code == 2 and "--token-file" not in err and "cannot reach the sidecar" in err, (address, err)
    code, out, err = await run("approvals", "list", "--address", "192.0.2.1:50051", "--timeout", "0.5")
    assert code == 2 and "--token-file" not in err, err  # no token, nothing to leak: tried, and unreachable
