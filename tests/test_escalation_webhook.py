"""The webhook on new escalations, against a real local HTTP server (aiohttp on 127.0.0.1).

Signatures are checked by the receiver's check docs/escalation.md documents (Standard Webhooks):
what a receiver runs takes every notice, retries included, and refuses a replay, a changed body or
id, and another secret's signature.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
from typing import Callable

import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.client import AsyncClient
from sidecar.escalation import EscalationRecord
from sidecar.escalation.notify import WebhookNotifier, signature
from tests.doubles.escalation import documented_webhook_verifier, make_config
from tests.infra.http import serve_app

EMAIL = {"to": "cfo@example.com", "body": "hi", "password": "hunter2"}
SECRET = b"a-shared-webhook-secret"
verify_webhook, WebhookRefused = documented_webhook_verifier()


def record(**changes) -> EscalationRecord:
    """A pending escalation as the store holds it, for the notifier on its own."""
    return dataclasses.replace(EscalationRecord(
        id="esc-1", fingerprint="f", subject="spiffe://dev.local/agent", subject_source="dev", delegation=(),
        tool="send_email", server="mail", arguments_digest="sha256:0", arguments_preview={}, task_id="t",
        intent="", call_id="c", decision_id="d", reasons=("high_risk_tool: a human approves this tool",),
        policy_revision="r", trace_id="t", span_id="s", created_at=0.0, expires_at=1.0), **changes)


class Receiver:
    """A webhook endpoint: answers the first `failures` requests with 503, then 200; can hold answers."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.requests: list[tuple[CIMultiDict, bytes]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.headers.copy(), body))
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
    secret.write_bytes(SECRET + b"\n")
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
    assert {name.lower() for name in headers} == HTTP_OWN | CONSTANT.keys() | STANDARD_WEBHOOKS  # nothing else
    for attempt, _ in hook.requests:
        verify_webhook(SECRET, attempt, body)  # each attempt, the 503'd one too, is the receiver's to check
    assert hook.requests[0][0]["webhook-id"] == headers["webhook-id"]  # the retry keeps the notice's id


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
    assert notifier.payload(record(reasons=reasons))["text"] == (
        "send_email on mail by spiffe://dev.local/agent needs approval: high_risk_tool, "
        "no rule allows this call, a reason with spaces: before its colon, sql_write (esc-1)")


# -- Standard Webhooks signatures, checked by the documented receiver ------------------------------------


async def test_a_receiver_that_verifies_takes_every_notice_and_retries_keep_the_id(tmp_path, running_sidecar):
    """The receiver runs the documented check on every request (401 when it refuses, which the sidecar
    does not retry); the first attempt of each notice is answered 503, so each notice is sent twice."""
    seen: list[tuple[CIMultiDict, bytes, bool]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify_webhook(SECRET, request.headers, body)
        except WebhookRefused:
            seen.append((request.headers.copy(), body, False))
            return web.Response(status=401)
        seen.append((request.headers.copy(), body, True))
        first = sum(1 for h, _, _ in seen if h["webhook-id"] == request.headers["webhook-id"]) == 1
        return web.Response(status=503 if first else 204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET)
    async with serve_app(app) as base:
        sidecar = await running_sidecar(make_config(tmp_path, **{
            "escalation.webhook_url": f"{base}/hook", "escalation.webhook_secret_file": str(secret),
            "escalation.webhook_attempts": 3, "escalation.webhook_backoff_seconds": 0.05}))
        async with AsyncClient(sidecar.addresses[0]) as agent:
            escalated = [await agent.authorize("send_email", EMAIL, task_id=task) for task in ("t-a", "t-b")]
            assert [e.outcome for e in escalated] == ["escalate", "escalate"]
        await sidecar.escalations.notifier.drain(60)
    assert [verified for _, _, verified in seen] == [True] * 4
    assert sidecar.escalations.notifier.sent == 2 and sidecar.escalations.notifier.failed == 0
    by_id: dict[str, list[bytes]] = {}
    for headers, body, _ in seen:
        by_id.setdefault(headers["webhook-id"], []).append(body)
    assert len(by_id) == 2, by_id.keys()  # one id a notice, the same on its retry
    notices = {json.loads(bodies[0])["escalation"]["escalation_id"] for bodies in by_id.values()}
    assert notices == {e.escalation_id for e in escalated}
    assert all(len(bodies) == 2 and bodies[0] == bodies[1] for bodies in by_id.values())


async def test_each_attempt_is_signed_at_its_own_time():
    """Retries 400 s apart (a long back-off): each attempt carries its own timestamp and passes the
    receiver's 5-minute check when it arrives. Signed once at the first attempt, the third would be
    refused as a replay (shown by checking the first attempt's headers at the third's time)."""
    stamps: list[int] = []

    def clock() -> float:
        stamps.append(1_800_000_000 + 400 * len(stamps))
        return stamps[-1] + 0.9  # a fraction: the header is whole seconds

    seen: list[tuple[CIMultiDict, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        verify_webhook(SECRET, request.headers, body, now=stamps[-1])  # the receiver's clock agrees with ours
        seen.append((request.headers.copy(), body))
        return web.Response(status=503 if len(seen) < 3 else 204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serve_app(app) as base:
        notifier = WebhookNotifier(f"{base}/hook", attempts=3, backoff_seconds=0.01, secret=SECRET, clock=clock)
        notifier.notify(record())
        await notifier.drain(30)
        await notifier.aclose()
    assert notifier.sent == 1 and len(seen) == 3
    assert [int(h["webhook-timestamp"]) for h, _ in seen] == stamps
    assert len({h["webhook-id"] for h, _ in seen}) == 1
    with pytest.raises(WebhookRefused, match="outside the tolerance"):
        verify_webhook(SECRET, seen[0][0], seen[0][1], now=stamps[-1])


# What a receiver may act on: the Standard Webhooks headers, each covered by the signature (webhook-signature
# signs "{webhook-id}.{webhook-timestamp}.{body}"). Everything else a notice carries is HTTP's own framing or
# a constant: nothing about the notice outside what is signed.
STANDARD_WEBHOOKS = {"webhook-id", "webhook-timestamp", "webhook-signature"}
HTTP_OWN = {"host", "content-length", "accept", "accept-encoding"}
CONSTANT = {"content-type": "application/json", "user-agent": "agent-sidecar-webhook/1"}


async def test_every_header_a_receiver_gets_is_signed_or_says_nothing_about_the_notice():
    """Two notices for different escalations: outside the three signed headers, only HTTP's framing and
    constants. An unsigned header naming the escalation (there was X-Sidecar-Escalation-Id) let anyone
    on the path send a genuine notice under another escalation's name to a receiver routing on it."""
    seen: list[tuple[CIMultiDict, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append((request.headers.copy(), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serve_app(app) as base:
        notifier = WebhookNotifier(f"{base}/hook", secret=SECRET)
        notifier.notify(record(id="esc-1"))
        notifier.notify(record(id="esc-2", tool="delete_repo", server="git", task_id="t-2"))
        await notifier.drain(30)
        await notifier.aclose()
    assert len(seen) == 2
    for headers, body in seen:
        names = [name.lower() for name in headers]
        assert len(names) == len(set(names))  # no header twice
        assert set(names) == HTTP_OWN | CONSTANT.keys() | STANDARD_WEBHOOKS
        for name, value in CONSTANT.items():
            assert headers[name] == value
        assert headers["host"] == base.removeprefix("http://") and headers["content-length"] == str(len(body))
        verify_webhook(SECRET, headers, body)  # webhook-id and webhook-timestamp are signed with the body
        escalation_id = json.loads(body)["escalation"]["escalation_id"]
        assert not any(escalation_id in value for name, value in headers.items() if name.lower() not in STANDARD_WEBHOOKS)
    assert {json.loads(body)["escalation"]["escalation_id"] for _, body in seen} == {"esc-1", "esc-2"}
    (first, _), (second, _) = seen
    for name in HTTP_OWN - {"content-length"}:
        assert first[name] == second[name]  # the same for every notice: nothing in them to route on


async def captured_notice() -> tuple[dict[str, str], bytes]:
    """One notice as a receiver gets it: (its webhook-* headers, lower-case names; its body)."""
    seen: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(({k.lower(): v for k, v in request.headers.items() if k.lower().startswith("webhook-")},
                     await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serve_app(app) as base:
        notifier = WebhookNotifier(f"{base}/hook", secret=SECRET)
        notifier.notify(record())
        await notifier.drain(30)
        await notifier.aclose()
    (notice,) = seen
    return notice


def _set(headers: dict[str, str], **changes: str) -> dict[str, str]:
    return {**headers, **{name.replace("_", "-"): value for name, value in changes.items()}}


def _resigned(headers: dict[str, str], body: bytes, key: bytes, **changes: str) -> dict[str, str]:
    """The headers with `changes`, signed with `key`: what someone holding `key` could send."""
    changed = _set(headers, **changes)
    return _set(changed, webhook_signature=signature(key, changed["webhook-id"], int(changed["webhook-timestamp"]), body))


OTHER_SECRET = b"another-webhook-secret-entirely"
# name -> (headers, body, sent at) -> (headers, body, the receiver's now)
TAMPERED: dict[str, Callable[[dict[str, str], bytes, int], tuple[dict[str, str], bytes, float]]] = {
    "replayed 5 minutes and a second later": lambda h, b, t: (h, b, t + 301),
    "replayed an hour later": lambda h, b, t: (h, b, t + 3600),
    "dated 5 minutes and a second ahead": lambda h, b, t: (h, b, t - 301),
    "replayed later under a new timestamp": lambda h, b, t: (_set(h, webhook_timestamp=str(t + 600)), b, t + 600),
    "another webhook-id": lambda h, b, t: (_set(h, webhook_id="msg_" + "0" * 32), b, t),
    "a webhook-id one character longer": lambda h, b, t: (_set(h, webhook_id=h["webhook-id"] + "0"), b, t),
    "a webhook-id with a dot": lambda h, b, t: (_resigned(h, b, SECRET, webhook_id="msg_1.2"), b, t),
    "a body one byte longer": lambda h, b, t: (h, b + b" ", t),
    "a body one byte shorter": lambda h, b, t: (h, b[:-1], t),
    "signed with another secret": lambda h, b, t: (_resigned(h, b, OTHER_SECRET), b, t),
    "a body re-signed with another secret": lambda h, b, t: (
        _resigned(h, b.replace(b"send_email", b"read_email"), OTHER_SECRET), b.replace(b"send_email", b"read_email"), t),
    "the signature of the body alone (the scheme before)": lambda h, b, t: (_set(h, webhook_signature="v1," + base64.b64encode(
        hmac.new(SECRET, b, hashlib.sha256).digest()).decode()), b, t),
    "no signature": lambda h, b, t: ({k: v for k, v in h.items() if k != "webhook-signature"}, b, t),
    "an empty signature": lambda h, b, t: (_set(h, webhook_signature=""), b, t),
    "the signature under another version": lambda h, b, t: (_set(h, webhook_signature="v1a," + h["webhook-signature"][3:]), b, t),
    "a non-ASCII signature": lambda h, b, t: (_set(h, webhook_signature=h["webhook-signature"] + "é"), b, t),
    "no timestamp": lambda h, b, t: ({k: v for k, v in h.items() if k != "webhook-timestamp"}, b, t),
    "a timestamp that is not an integer": lambda h, b, t: (_set(h, webhook_timestamp=f"{t}.0"), b, t),
    "no webhook-id": lambda h, b, t: ({k: v for k, v in h.items() if k != "webhook-id"}, b, t),
}


@pytest.mark.parametrize("tamper", TAMPERED, ids=str)
async def test_the_documented_check_refuses(tamper: str):
    headers, body = await captured_notice()
    sent_at = int(headers["webhook-timestamp"])
    verify_webhook(SECRET, headers, body, now=sent_at)  # the notice itself passes
    verify_webhook(SECRET, headers, body, now=sent_at + 300)  # ... to the edge of the tolerance
    changed, changed_body, now = TAMPERED[tamper](headers, body, sent_at)
    with pytest.raises(WebhookRefused):
        verify_webhook(SECRET, changed, changed_body, now=now)


async def test_the_documented_check_refuses_a_change_of_any_one_byte():
    headers, body = await captured_notice()
    sent_at = int(headers["webhook-timestamp"])
    for i in range(len(body)):
        changed = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:]
        with pytest.raises(WebhookRefused):
            verify_webhook(SECRET, headers, changed, now=sent_at)
    for name in ("webhook-id", "webhook-timestamp"):
        value = headers[name]
        for i in range(len(value)):
            flipped = value[:i] + chr(ord(value[i]) ^ 0x01) + value[i + 1:]
            with pytest.raises(WebhookRefused):
                verify_webhook(SECRET, {**headers, name: flipped}, body, now=sent_at)


async def test_the_documented_check_verifies_with_the_secret_being_rotated_in():
    """While a secret is rotated a sender may send both signatures, space-separated: either one passes."""
    headers, body = await captured_notice()
    sent_at = int(headers["webhook-timestamp"])
    other = signature(OTHER_SECRET, headers["webhook-id"], sent_at, body)
    verify_webhook(SECRET, _set(headers, webhook_signature=f"{other} {headers['webhook-signature']}"), body, now=sent_at)
    verify_webhook(OTHER_SECRET, _set(headers, webhook_signature=f"{other} {headers['webhook-signature']}"), body,
                   now=sent_at)
    with pytest.raises(WebhookRefused):
        verify_webhook(OTHER_SECRET, headers, body, now=sent_at)  # the sidecar's signature, another receiver's secret
