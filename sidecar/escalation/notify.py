"""Tell people a call is waiting: a JSON POST to a webhook for each new escalation.

Sent in the background: the agent has its ESCALATE answer before the first
attempt starts, and a webhook that is down never slows or fails a decision.
Connection errors, timeouts, 429 and 5xx answers are retried with
exponential backoff (tenacity) up to `escalation.webhook_attempts`; other
answers are final. With a secret (at least 16 bytes), each attempt is signed the Standard
Webhooks way (https://www.standardwebhooks.com): `webhook-id` (`msg_` and 32 random hex digits,
one per notice, the same on its retries: the receiver's idempotency key, not the escalation's
id), `webhook-timestamp` (the attempt's, in integer Unix seconds, so a receiver refuses an old
request replayed) and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`
(`signature`). docs/escalation.md has the receiver's check.

Nothing about the notice travels outside what is signed: besides those three headers the
request carries only HTTP's own (Host, Content-Length, Accept, Accept-Encoding) and two
constants (`Content-Type: application/json`, `User-Agent`). A receiver that routed on an
unsigned header naming the escalation could be sent a genuine notice under another name, so
the escalation's id is read from the signed body (`escalation.escalation_id`), never a header.

Payload (ASCII-only JSON: every non-ASCII and control character is a JSON escape):

    {"type": "escalation.created", "escalation": {...Escalation as JSON, exact...},
     "text": "send_email by spiffe://example.org/agent needs approval: high_risk_tool (esc-...)",
     "hidden_characters": ["task_id"],        # fields holding control or invisible characters
     "console_url": "https://approvals.example.org/escalations/esc-..."}   # when console_url is set

`text` is for chat tools that show a webhook's "text" (Slack-style): every value in it is
shown with hidden characters escaped and flagged "[!]" (sidecar/display.py), and with `&`, `<`
and `>` as `&amp;`, `&lt;`, `&gt;` (Slack's escapes: no link, mention or @channel comes from
a value), so it reads as what will run. `escalation` keeps the exact values for programs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from sidecar.config import ConfigError, url_for_messages
from sidecar.display import FLAG, NOTICE, cell, exact_json, flagged
from sidecar.escalation import EscalationRecord
from sidecar.reasons import parse

log = logging.getLogger(__name__)

USER_AGENT = "agent-sidecar-webhook/1"


# A shorter webhook secret is refused: b"" (an empty or blank secret file) sent every notice unsigned.
MIN_SECRET_BYTES = 16


class RetryableWebhookError(Exception):
    pass


def signature(secret: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` of one attempt (Standard Webhooks, symmetric): the id and the
    timestamp are signed with the body, so neither can be changed, nor the body sent again later
    under a new timestamp, without the secret."""
    mac = hmac.new(secret, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def load_webhook_secret(path: str) -> bytes:
    """The secret in `path` (surrounding whitespace removed); ConfigError naming the key, never the
    secret, when it cannot be read or is shorter than MIN_SECRET_BYTES."""
    try:
        data = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"escalation.webhook_secret_file: cannot read {path}: {exc.strerror}") from None
    if len(data) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"escalation.webhook_secret_file: {path} holds {len(data)} bytes (after surrounding whitespace); "
            f"at least {MIN_SECRET_BYTES} are needed, or notices go out unsigned or easy to forge"
        )
    return data


class Notifier(Protocol):
    """Tells people about a new escalation (EscalationService's `notifier`).

    `notify` must return at once and never raise: delivery happens in the background, and
    a notifier that is down never slows or fails a decision. `aclose` waits for deliveries
    in flight for at most `grace` seconds.
    """

    def notify(self, record: EscalationRecord) -> None: ...

    async def aclose(self, grace: float = 1.0) -> None: ...


class WebhookNotifier:
    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float = 5.0,
        attempts: int = 5,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
        secret: bytes | None = None,
        console_url: str = "",
        max_in_flight: int = 100,
        clock: Callable[[], float] = time.time,
    ):
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the webhook secret must be at least {MIN_SECRET_BYTES} bytes (an empty one signs nothing)")
        self.url = url
        self._timeout = timeout_seconds
        self._attempts = attempts
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._secret = secret
        self._console_url = console_url.rstrip("/")
        self._max_in_flight = max_in_flight
        self._clock = clock  # the attempts' webhook-timestamp
        self._tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def payload(self, record: EscalationRecord) -> dict[str, Any]:
        escalation = record.to_json()
        hidden = flagged(escalation)
        codes = ", ".join(chat(_code_or_text(reason)) for reason in record.reasons)
        text = (f"{chat(record.tool)}" + (f" on {chat(record.server)}" if record.server else "")
                + f" by {chat(record.subject)} needs approval: {codes} ({chat(record.id)})")
        if hidden:
            text += f"\n{FLAG} {', '.join(hidden)} {NOTICE}"
        body: dict[str, Any] = {"type": "escalation.created", "escalation": escalation, "text": text,
                                "hidden_characters": hidden}
        if self._console_url:
            body["console_url"] = f"{self._console_url}/escalations/{record.id}"
        return body

    def notify(self, record: EscalationRecord) -> None:
        """Queue one notification and return at once."""
        if len(self._tasks) >= self._max_in_flight:
            self.dropped += 1
            log.warning("webhook: %d notifications in flight; not sending one for %s", len(self._tasks), record.id)
            return
        task = asyncio.get_running_loop().create_task(self._deliver(record), name=f"webhook-{record.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, record: EscalationRecord) -> None:
        body = exact_json(self.payload(record), sort_keys=True).encode()
        webhook_id = "msg_" + secrets.token_hex(16)  # this notice's, kept by its retries (no "." in it)
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._attempts),
                wait=wait_exponential(multiplier=self._backoff, max=self._max_backoff),
                retry=retry_if_exception_type((RetryableWebhookError, aiohttp.ClientError, TimeoutError)),
                reraise=True,
            ):
                with attempt:
                    await self._post(body, self._headers(webhook_id, body))
            self.sent += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed += 1
            # an aiohttp error can name the URL (InvalidURL, a redirect's Location): only its type and host here
            log.warning("webhook: giving up on %s after %d attempts to %s: %s", record.id, self._attempts,
                        url_for_messages(self.url), _without_url(exc, self.url))

    def _headers(self, webhook_id: str, body: bytes) -> dict[str, str]:
        """One attempt's headers: signed anew with its own timestamp, so a retry late in a long
        back-off is as fresh to the receiver as the first attempt."""
        timestamp = int(self._clock())
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "webhook-id": webhook_id, "webhook-timestamp": str(timestamp)}
        if self._secret:
            headers["webhook-signature"] = signature(self._secret, webhook_id, timestamp, body)
        return headers

    async def _post(self, body: bytes, headers: dict[str, str]) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        async with self._session.post(self.url, data=body, headers=headers, allow_redirects=False) as response:
            await response.read()
            if response.status == 429 or response.status >= 500:
                raise RetryableWebhookError(f"HTTP {response.status}")
            if response.status >= 300:
                log.warning("webhook: %s answered HTTP %d; not retried", url_for_messages(self.url), response.status)
                raise _Final(f"HTTP {response.status}")

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for notifications in flight (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def aclose(self, grace: float = 1.0) -> None:
        await self.drain(grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Final(Exception):
    """An answer that retrying will not change."""


def chat(value: str) -> str:
    """A value for the `text` of a chat tool: `cell(value)`, with the three characters Slack-style
    `text` reads as markup escaped the way it documents (&amp; &lt; &gt;), so it shows them as
    written. Unescaped, `<https://x.example|mail>` became a link labelled `mail` and `<!channel>`
    paged the channel: a server name or a policy's reason holds what an agent sent."""
    return cell(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _without_url(exc: BaseException, url: str) -> str:
    text = str(exc) or type(exc).__name__
    return text.replace(url, url_for_messages(url)) if url and url in text else text


def _code_or_text(reason: str) -> str:
    """What the one-line text names a reason by: its code (sidecar/reasons.py), or the whole
    reason when policy gave it none ("no rule allows this call")."""
    parsed = parse(reason)
    return parsed.code if parsed is not None else reason
