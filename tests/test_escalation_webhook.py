"""The webhook on new escalations, against a real local HTTP server (aiohttp on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import pytest
from aiohttp import web

from sidecar.client import AsyncClient
from sidecar.escalation import EscalationRecord
from sidecar.escalation.notify import WebhookNotifier
from tests.doubles.escalation import make_config

EMAIL = {"to": "cfo@example.com", "body": "hi", "password": "hunter2"}


class Receiver:
    """A webhook endpoint: answers the first `failures` requests with 503, then 200; can hold answers."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.requests: list[tuple[dict, bytes]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        await self.release.wait()
        if len(self.requests) <= self.failures:
            return web.Response(status=503, text="try later")
        return web.Response(status=204)

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"
        return self

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def receiver():
    made: list[Receiver] = []

    async def make(failures: int = 0) -> Receiver:
        r = await Receiver(failures).start()
        made.append(r)
        return r

    yield make
    for r in made:
        await r.stop()


async def test_new_escalations_are_posted_retried_and_never_block_the_decision(tmp_path, receiver, running_sidecar):
    hook = await receiver(failures=1)
    secret = tmp_path / "webhook.secret"
    secret.write_text("a-shared-webhook-secret\n")
    sidecar = await running_sidecar(make_config(tmp_path, **{
        "escalation.webhook_url": hook.url,
        "escalation.webhook_secret_file": str(secret),
        "escalation.console_url": "https://approvals.example.org/",
        "escalation.webhook_attempts": 3,
        "escalation.webhook_backoff_seconds": 0.05,  # keep the test quick; the schedule is tenacity's
        # a decision that waited for the hanging receiver would take this long (not a loaded machine's second)
        "escalation.webhook_timeout_seconds": 30,
    }))
    hook.release.clear()  # the receiver hangs: the agent must not wait for it
    async with AsyncClient(sidecar.addresses[0]) as agent:
        started = time.monotonic()
        escalated = await agent.authorize("send_email", EMAIL, task_id="t-9")
        assert escalated.outcome == "escalate"
        assert time.monotonic() - started < 5.0  # far below the webhook's 30 s: the decision did not wait for it
        again = await agent.authorize("send_email", EMAIL, task_id="t-9")  # same escalation: no second notice
        assert again.escalation_id == escalated.escalation_id
        # the first notice reaches the (hanging) receiver in the background: wait for it, not for 0.1 s
        deadline = time.monotonic() + 60
        while not hook.requests:
            assert time.monotonic() < deadline, "the webhook never reached the receiver"
            await asyncio.sleep(0.02)
        assert len(hook.requests) == 1
        hook.release.set()
        await sidecar.escalations.notifier.drain(60)  # ends as soon as the notice is delivered

    assert len(hook.requests) == 2  # 503 first, then delivered
    assert sidecar.escalations.notifier.sent == 1 and sidecar.escalations.notifier.failed == 0
    headers, body = hook.requests[-1]
    assert hook.requests[0][1] == body
    payload = json.loads(body)
    assert payload["type"] == "escalation.created"
    assert payload["console_url"] == f"https://approvals.example.org/escalations/{escalated.escalation_id}"
    escalation = payload["escalation"]
    assert escalation["escalation_id"] == escalated.escalation_id and escalation["state"] == "pending"
    assert escalation["tool"] == "send_email" and escalation["task_id"] == "t-9"
    assert escalation["reasons"] == ["high_risk_tool: a human approves this tool"]
    assert escalation["arguments_preview"]["password"] == "[REDACTED]"
    assert b"hunter2" not in body
    assert headers["Content-Type"] == "application/json"
    expected = hmac.new(b"a-shared-webhook-secret", body, hashlib.sha256).hexdigest()
    assert headers["X-Sidecar-Signature"] == f"sha256={expected}"


async def test_a_webhook_that_is_down_changes_nothing(tmp_path, receiver, running_sidecar):
    hook = await receiver()
    url = hook.url
    await hook.stop()  # nothing listens there any more: connection refused
    sidecar = await running_sidecar(make_config(tmp_path, **{"escalation.webhook_url": url,
                                                             "escalation.webhook_attempts": 2,
                                                             "escalation.webhook_backoff_seconds": 0.01}))
    async with AsyncClient(sidecar.addresses[0]) as agent:
        escalated = await agent.authorize("send_email", EMAIL)
        assert escalated.outcome == "escalate" and escalated.escalation_id
        await sidecar.escalations.notifier.drain(60)
    assert sidecar.escalations.notifier.failed == 1 and sidecar.escalations.notifier.sent == 0


async def test_a_client_error_is_not_retried(tmp_path, running_sidecar):
    hits = []

    async def reject(request: web.Request) -> web.Response:
        hits.append(await request.read())
        return web.Response(status=400)

    app = web.Application()
    app.router.add_post("/hook", reject)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        sidecar = await running_sidecar(make_config(tmp_path, **{
            "escalation.webhook_url": f"http://127.0.0.1:{port}/hook", "escalation.webhook_attempts": 4}))
        async with AsyncClient(sidecar.addresses[0]) as agent:
            await agent.authorize("send_email", EMAIL)
            await sidecar.escalations.notifier.drain(60)
        assert len(hits) == 1 and sidecar.escalations.notifier.failed == 1
    finally:
        await runner.cleanup()


def test_the_text_names_each_reason_by_its_code_or_whole_when_it_has_none():
    """A reason without a code (policy may give one) is named whole, not cut at a ": " inside it."""
    notifier = WebhookNotifier("http://127.0.0.1:1/")
    reasons = ("high_risk_tool: a human approves this tool", "no rule allows this call",
               "a reason with spaces: before its colon", " sql_write : padded code")
    record = EscalationRecord(
        id="esc-1", fingerprint="f", subject="spiffe://dev.local/agent", subject_source="dev", delegation=(),
        tool="send_email", server="mail", arguments_digest="sha256:0", arguments_preview={}, task_id="t",
        intent="", call_id="c", decision_id="d", reasons=reasons, policy_revision="r",
        trace_id="t", span_id="s", created_at=0.0, expires_at=1.0)
    assert notifier.payload(record)["text"] == (
        "send_email on mail by spiffe://dev.local/agent needs approval: high_risk_tool, "
        "no rule allows this call, a reason with spaces: before its colon, sql_write (esc-1)")
