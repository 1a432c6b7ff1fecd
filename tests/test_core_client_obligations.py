"""The client library's guard runs a tool only as policy allowed it, obligations included.

Policy may allow a call on condition: `drop_arguments`, `redact_call_arguments`, `clamp_arguments`,
`cap_list_arguments` change what the tool receives. In wrapper mode (Invoke, the MCP gateway) the
sidecar applies them before the call leaves (sidecar/invoke/obligations.py) and refuses obligations
it does not know. The guard runs the Python function itself and cannot apply them to its
arguments; it must not run the tool with the arguments policy meant to change. Found by a review:
the guard ran `transfer(amount=5000)` where policy allowed it clamped to 100.
The display obligations (`record_arguments`, `redact_arguments`) concern the evidence and the
approvers' view, and other keys are the caller's own to read: neither stops the call.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.client import AsyncClient, AuthorizationDenied, Client, ObligationsNotApplied
from tests.conftest import write_policy

POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok: clamped"], "obligations": {"clamp_arguments": {"amount": 100}}} if {
        input.tool.name == "transfer"
    }

    decision := {"outcome": "allow", "reasons": ["ok: without debug"], "obligations": {"drop_arguments": ["debug"]}} if {
        input.tool.name == "search"
    }

    decision := {"outcome": "allow", "reasons": ["ok: a new obligation"], "obligations": {"notify_owner": true}} if {
        input.tool.name == "archive"
    }

    decision := {"outcome": "allow", "reasons": ["ok: shown only"], "obligations": {
        "record_arguments": true, "redact_arguments": ["token"],
    }} if {
        input.tool.name == "lookup"
    }
"""


@pytest.fixture
async def sidecar(tmp_path, sidecar_config, running_sidecar):
    return await running_sidecar(sidecar_config(**{
        "policy.dir": str(write_policy(tmp_path / "policy", POLICY)), "listen.unix": "",
    }))


async def test_sync_guard_does_not_run_a_tool_whose_allow_changes_the_call(sidecar):
    ran: list[tuple] = []
    address = sidecar.addresses[0]

    def use_client() -> None:
        with Client(address) as client:

            @client.guard()
            def transfer(to: str, amount: int) -> None:
                ran.append(("transfer", amount))

            @client.guard()
            def search(query: str, debug: bool = False) -> None:
                ran.append(("search", debug))

            @client.guard()
            def archive(path: str) -> None:
                ran.append(("archive", path))

            @client.guard()
            def lookup(key: str, token: str) -> str:
                ran.append(("lookup", key))
                return "found"

            for call, keys in ((lambda: transfer("acme", 5000), ["clamp_arguments"]),
                               (lambda: search("x", debug=True), ["drop_arguments"])):
                with pytest.raises(ObligationsNotApplied) as refused:
                    call()
                assert refused.value.obligations == keys
                assert isinstance(refused.value, PermissionError)
                assert refused.value.result.outcome == "allow"  # policy allowed it, on condition
            assert lookup("k", token="t") == "found"  # display obligations never stop a call
            archive("/data")  # nor one addressed to the caller's own code (it reads result.obligations)
            # authorize() itself only reports: the obligations are there for the caller to honour
            answer = client.authorize("transfer", {"to": "acme", "amount": 5000})
            assert answer.outcome == "allow" and answer.obligations == {"clamp_arguments": {"amount": 100}}

    await asyncio.to_thread(use_client)
    assert ran == [("lookup", "k"), ("archive", "/data")]


async def test_async_guard_does_not_run_a_tool_whose_allow_changes_the_call(sidecar):
    ran: list[int] = []
    async with AsyncClient(sidecar.addresses[0]) as client:

        @client.guard()
        async def transfer(to: str, amount: int) -> None:
            ran.append(amount)

        with pytest.raises(ObligationsNotApplied) as refused:
            await transfer("acme", 5000)
        assert "clamp_arguments" in str(refused.value) and refused.value.result.decision_id

        @client.guard(tool="nothing_allows_this")
        async def other() -> None:
            ran.append(-1)

        with pytest.raises(AuthorizationDenied):
            await other()
    assert ran == []
