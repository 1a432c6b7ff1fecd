"""What the escalation webhook must keep secret, and from whom.

- Its signing secret: a blank or short `escalation.webhook_secret_file` (a Kubernetes
  Secret created with an empty value gave b"", and notices went out unsigned, so a
  receiver that checks a signature only when one is present took forged notices as the
  sidecar's) stops the start, saying why without the secret.
- Its URL, a bearer credential for Slack- and Teams-style hooks: never whole in a
  start-up error or in the log.
- The chat text: what an agent wrote (its call's server) reaches it escaped, never as
  a link or a mention.
"""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.client import AsyncClient
from sidecar.config import ConfigError, load_config
from sidecar.escalation.notify import MIN_SECRET_BYTES, WebhookNotifier
from tests.doubles.escalation import documented_webhook_verifier, make_config
from tests.infra.http import serve_app

EMAIL = {"to": "cfo@example.com", "body": "Q3 numbers"}


def webhook_config(tmp_path, url: str, secret: bytes = b"a-shared-webhook-secret"):
    """The escalation test config with a webhook to `url`, signed with `secret` (written to a file as given)."""
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(secret)
    return make_config(tmp_path, **{"escalation.webhook_url": url, "escalation.webhook_secret_file": str(secret_file)})


@pytest.mark.parametrize("content", [b"", b"\n", b"  \r\n\t", b"k", b"fifteen-bytes!!"])
async def test_a_blank_or_short_secret_is_refused_at_start(tmp_path, running_sidecar, content):
    config = webhook_config(tmp_path, "http://127.0.0.1:9/hook", content)
    secret = config.escalation.webhook_secret_file
    with pytest.raises(ConfigError) as info:
        await running_sidecar(config)
    message = str(info.value)
    assert message.startswith("escalation.webhook_secret_file:") and str(secret) in message
    assert f"at least {MIN_SECRET_BYTES}" in message
    if len(content.strip()) >= 8:
        assert content.strip().decode() not in message.replace(str(secret), "")  # the secret is never shown


async def test_an_unreadable_secret_file_is_a_config_error(tmp_path, running_sidecar):
    config = make_config(tmp_path, **{
        "escalation.webhook_url": "http://127.0.0.1:9/hook",
        "escalation.webhook_secret_file": str(tmp_path / "missing.secret"),
    })
    with pytest.raises(ConfigError, match="escalation.webhook_secret_file: cannot read"):
        await running_sidecar(config)


def test_the_notifier_itself_refuses_an_empty_secret():
    with pytest.raises(ValueError):
        WebhookNotifier("http://127.0.0.1:9/hook", secret=b"")
    WebhookNotifier("http://127.0.0.1:9/hook", secret=None)  # no secret at all is dev mode's choice


async def test_a_secret_of_the_minimum_length_signs_every_notice(tmp_path, running_sidecar):
    received: list[tuple[CIMultiDict, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((request.headers.copy(), await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serve_app(app) as base:
        key = b"x" * MIN_SECRET_BYTES
        sidecar = await running_sidecar(webhook_config(tmp_path, f"{base}/hook", key + b"\n"))
        async with AsyncClient(sidecar.addresses[0]) as agent:
            assert (await agent.authorize("send_email", EMAIL, task_id="t-w")).outcome == "escalate"
        await sidecar.escalations.notifier.drain(30)
    assert len(received) == 1
    headers, body = received[0]
    verify_webhook, _ = documented_webhook_verifier()
    verify_webhook(key, headers, body)  # the receiver's check, keyed with the file's bytes less the newline


# -- agent-controlled text in the chat summary -------------------------------------------------------

LINK_SERVER = "<https://evil.example/approve|mail> <!channel> & <@U024BE7LH>"


async def test_no_link_or_mention_reaches_the_chat_text(tmp_path, running_sidecar):
    """An agent names the server of its call (a catalog entry without `server` does not check it, and the
    test policy checks none): `<https://evil.example/approve|mail>` reached Slack-style `text` as written,
    shown as a link labelled "mail" to the attacker's page, and `<!channel>` paged everyone."""
    received: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serve_app(app) as base:
        sidecar = await running_sidecar(webhook_config(tmp_path, f"{base}/hook"))
        async with AsyncClient(sidecar.addresses[0]) as agent:
            result = await agent.authorize("send_email", EMAIL, task_id="t-link", server=LINK_SERVER)
            assert result.outcome == "escalate", result.reasons
        await sidecar.escalations.notifier.drain(30)

    payload = json.loads(received[0])
    text = payload["text"]
    assert "<" not in text and ">" not in text, text
    assert "&lt;https://evil.example/approve|mail&gt; &lt;!channel&gt; &amp; &lt;@U024BE7LH&gt;" in text
    # decoded as Slack decodes it, the text shows the server exactly as the agent sent it
    shown = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert f" on {LINK_SERVER} by " in shown
    assert payload["escalation"]["server"] == LINK_SERVER  # programs still get the exact value


# -- webhook URLs are credentials -------------------------------------------------------------------

SLACK_SECRET = "xq7Wb2Ln9SECRETpathPART"
BAD_URLS = [
    ("escalation.webhook_url", f"hooks.slack.com/services/T0AAA/B0BBB/{SLACK_SECRET}"),  # the scheme forgotten
    ("escalation.webhook_url", f"ftp://bot:{SLACK_SECRET}@hooks.example.org/x"),
    ("escalation.webhook_url", f"https://hooks.example.org:44x/services/{SLACK_SECRET}"),
    ("escalation.console_url", f"approvals.example.org/?token={SLACK_SECRET}"),
    ("console.jaeger_url", f"jaeger:16686/?api_key={SLACK_SECRET}"),
]


@pytest.mark.parametrize("key, url", BAD_URLS)
def test_a_refused_url_is_named_without_its_secret(key: str, url: str):
    """A Slack or Teams incoming-webhook URL is a bearer credential in its path: a mistyped one was
    echoed whole in the start-up error (stderr, the pod's log)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, {"identity.sources": ["dev"], key: url})
    message = str(info.value)
    assert message.startswith(f"{key}:") and SLACK_SECRET not in message, message


@pytest.mark.parametrize("section", ["mcp.upstreams", "invoke.tools"])
def test_a_refused_tool_url_is_named_without_its_query(tmp_path, section: str):
    name = "docs" if section == "mcp.upstreams" else "lookup"
    path = tmp_path / "sidecar.yaml"
    mapping = section.split(".")[1]
    path.write_text(f"identity:\n  sources: [dev]\n{section.split('.')[0]}:\n  {mapping}:\n    {name}:\n"
                    f"      url: 'gopher://tools.example.org/q?api_key={SLACK_SECRET}'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, runs_sidecar=False)
    assert f"{section}.{name}.url:" in str(info.value) and SLACK_SECRET not in str(info.value)


async def test_the_webhook_url_never_reaches_the_log(tmp_path, running_sidecar, caplog):
    """A receiver answering 404 (a revoked Slack hook does) made the sidecar log the whole URL at WARNING."""
    hits: list[str] = []

    async def gone(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=404, text="no_service")

    app = web.Application()
    app.router.add_post("/services/T0AAA/B0BBB/{token}", gone)
    async with serve_app(app) as base:
        sidecar = await running_sidecar(webhook_config(tmp_path, f"{base}/services/T0AAA/B0BBB/{SLACK_SECRET}"))
        caplog.set_level("INFO")
        async with AsyncClient(sidecar.addresses[0]) as agent:
            assert (await agent.authorize("send_email", EMAIL, task_id="t-404")).outcome == "escalate"
        await sidecar.escalations.notifier.drain(30)
    assert hits == [f"/services/T0AAA/B0BBB/{SLACK_SECRET}"]  # the notice went where configured
    assert sidecar.escalations.notifier.failed == 1
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("sidecar"))  # not the receiver's
    assert f"{base}/…" in logged and "HTTP 404" in logged, logged
    assert SLACK_SECRET not in logged
