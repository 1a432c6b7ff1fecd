"""The agent-side client library and its guard, against a real sidecar."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.client import AsyncClient, AuthorizationDenied, Client, EscalationRequired, NotExact


async def test_sync_guard_runs_the_tool_only_when_allowed(sidecar):
    ran: list[str] = []
    address = sidecar.addresses[0]

    def use_client() -> None:
        with Client(address) as client:

            @client.guard()
            def read_file(path: str, encoding: str = "utf-8") -> str:
                ran.append(path)
                return f"contents of {path}"

            @client.guard(tool="send_email")
            def email(to: list[str], subject: str, body: str) -> None:
                ran.append(to)

            assert read_file("/workspace/a.txt") == "contents of /workspace/a.txt"
            with pytest.raises(AuthorizationDenied) as denied:
                read_file("/etc/shadow")
            assert denied.value.reasons and denied.value.result.decision_id
            with pytest.raises(EscalationRequired) as escalated:
                email(["cfo@example.com"], "Q3", body="numbers")
            assert escalated.value.result.outcome == "escalate"

    await asyncio.to_thread(use_client)
    assert ran == ["/workspace/a.txt"]


async def test_async_guard_passes_bound_arguments_with_defaults(sidecar):
    ran = []
    async with AsyncClient(sidecar.addresses[1]) as client:  # the unix socket

        @client.guard(task_id="task-7")
        async def search_docs(query: str, limit: int = 5) -> list[str]:
            ran.append((query, limit))
            return [query] * limit

        assert await search_docs("sidecar") == ["sidecar"] * 5

        @client.guard()
        async def no_such_tool() -> None:
            ran.append("never")

        with pytest.raises(AuthorizationDenied):
            await no_such_tool()
    assert ran == [("sidecar", 5)]


async def test_guard_refuses_arguments_that_are_not_json(sidecar):
    async with AsyncClient(sidecar.addresses[0]) as client:

        @client.guard()
        async def search_docs(query: object) -> None:
            pass

        with pytest.raises(NotExact, match="arguments.query: a value of type object is not JSON"):
            await search_docs(object())


async def test_async_guard_rejects_plain_functions():
    client = AsyncClient("127.0.0.1:1")
    with pytest.raises(TypeError, match="async"):
        client.guard()(lambda: None)
