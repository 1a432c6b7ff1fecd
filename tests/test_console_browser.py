"""The console end to end in a real headless Chromium: load the page, approve one, deny one.

Debian's `chromium` package (installed by `make test`), driven by Playwright
for Python through `executable_path`: no browser is downloaded
(`playwright install` is never run). The browser context sends the header
an auth proxy would (X-Auth-Request-Email), so the approver is
email:alice@example.org. Screenshots at 1280x800 are saved in
tests/artifacts/ (gitignored: console-*.png), to be looked at.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from sidecar.client import AsyncClient
from sidecar.console.app import start_console
from sidecar.escalation.client import ApprovalsClient
from tests.doubles.escalation import make_config, records

CHROMIUM = os.environ.get("SIDECAR_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
APPROVER = "email:alice@example.org"
ARTIFACTS = Path(__file__).parent / "artifacts"
VIEWPORT = {"width": 1280, "height": 800}
LONG_NOTE = ("checked with finance: the Q3 numbers match the board pack that went out last Tuesday, "
             "fine to send to the CFO before the call")


def screenshot_path(name: str) -> str:
    ARTIFACTS.mkdir(exist_ok=True)
    return str(ARTIFACTS / name)


@pytest.fixture
async def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package (make system-deps)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def signed_in_as_alice(browser):
    """A browser context sending the header the auth proxy would set for alice (the approver APPROVER)."""
    return await browser.new_context(viewport=VIEWPORT, extra_http_headers={"X-Auth-Request-Email": "alice@example.org"})


async def test_load_the_page_approve_one_deny_one(tmp_path, running_sidecar, browser):
    config = make_config(tmp_path, **{
        "console.trusted_header": "X-Auth-Request-Email",
        "console.jaeger_url": "http://jaeger.example:16686",
    })
    sidecar = await running_sidecar(config)
    address = sidecar.addresses[0]
    config.console.sidecar = address
    email_args = {"to": "cfo@example.com", "body": "Q3 numbers attached", "api_token": "s3cret"}
    async with AsyncClient(address) as agent:
        email = await agent.authorize("send_email", email_args, task_id="task-42")
        repo = await agent.authorize("delete_repo", {"repo": "acme/legacy-billing"})
    assert (email.outcome, repo.outcome) == ("escalate", "escalate"), (email.reasons, repo.reasons)
    runner, port = await start_console(config, "127.0.0.1:0")
    base = f"http://127.0.0.1:{port}"
    try:
        context = await signed_in_as_alice(browser)
        page = await context.new_page()
        await page.goto(base + "/")
        await page.screenshot(path=screenshot_path("console-pending.png"), full_page=True)
        assert await page.title() == "Pending approvals"
        assert await page.locator('[data-testid="approver"]').inner_text() == APPROVER
        cards = page.locator("section.card")
        assert await cards.count() == 2
        email_card = page.locator(f'section[data-escalation-id="{email.escalation_id}"]')
        repo_card = page.locator(f'section[data-escalation-id="{repo.escalation_id}"]')
        text = await email_card.inner_text()
        assert "send_email" in text and "spiffe://dev.local/agent" in text and "task-42" in text
        assert "high_risk_tool: a human approves this tool" in text
        # alice may decide it: the arguments in full, the secret too (it never reaches the evidence log)
        assert "in full, exactly as the tool will receive them" in text and '"api_token": "s3cret"' in text
        assert "expires" in text and "in 14m" in text
        trace = email_card.locator("a[href*='/trace/']")
        assert await trace.get_attribute("href") == f"http://jaeger.example:16686/trace/{email.trace_id}"

        await email_card.locator("textarea[name=note]").fill(LONG_NOTE)
        await email_card.get_by_role("button", name="Approve").click()
        await page.wait_for_url(f"{base}/?approved={email.escalation_id}")
        assert f"Approved {email.escalation_id}" in await page.locator(".banner.ok").inner_text()
        assert await page.locator("section.card").count() == 1

        await repo_card.locator("textarea[name=note]").fill("not during the freeze")
        await repo_card.get_by_role("button", name="Deny").click()
        await page.wait_for_url(f"{base}/?denied={repo.escalation_id}")
        assert "Nothing is waiting for a decision." in await page.locator("main").inner_text()
        await page.screenshot(path=screenshot_path("console-after.png"), full_page=True)

        await page.get_by_role("link", name="History").click()
        await page.wait_for_url(f"{base}/history")
        rows = page.locator("tbody tr")
        assert await rows.count() == 2
        history = await page.locator("table").inner_text()
        assert "APPROVED" in history and "DENIED" in history and "checked with finance" in history
        assert APPROVER in history
        await page.screenshot(path=screenshot_path("console-history.png"), full_page=True)
        await assert_rows_on_one_line(page)
        await context.close()
    finally:
        await runner.cleanup()

    async with ApprovalsClient(address) as approvals:
        approved = await approvals.get(email.escalation_id)
        denied = await approvals.get(repo.escalation_id)
    assert (approved["state"], approved["approver"], approved["note"]) == ("approved", APPROVER, LONG_NOTE)
    assert (denied["state"], denied["approver"], denied["note"]) == ("denied", APPROVER, "not during the freeze")
    async with AsyncClient(address) as agent:
        assert (await agent.authorize("send_email", email_args, task_id="task-42",
                                      escalation_id=email.escalation_id)).outcome == "allow"
        assert (await agent.authorize("delete_repo", {"repo": "acme/legacy-billing"},
                                      escalation_id=repo.escalation_id)).outcome == "deny"
    kinds = [(r["kind"], r["outcome"], r.get("approver")) for r in records(tmp_path / "evidence")
             if r["kind"] in ("approval", "human_denial")]
    assert kinds == [("approval", "approved", APPROVER), ("human_denial", "denied", APPROVER)]
    assert "s3cret" not in "".join(p.read_text() for p in (tmp_path / "evidence").glob("evidence-*.jsonl"))


async def until_waiting(address: str, escalation_id: str, waiting: asyncio.Task, timeout: float = 60.0) -> None:
    """Until the sidecar notes the agent's open AwaitDecision (`waiting`, opening in the background):
    polled up to a generous deadline for a loaded machine; the agent's own error if it ends first."""
    deadline = time.monotonic() + timeout
    async with ApprovalsClient(address) as approvals:
        while not (await approvals.get(escalation_id))["agent_waiting"]:
            if waiting.done():
                raise AssertionError(f"the agent's AwaitDecision on {escalation_id} ended: {waiting.result()!r}")
            assert time.monotonic() < deadline, f"the agent's AwaitDecision on {escalation_id} was never noted"
            await asyncio.sleep(0.05)


async def assert_rows_on_one_line(page) -> None:
    """Every history cell is one line high: the table does not wrap at this width."""
    heights = await page.locator("tbody td").evaluate_all(
        "cells => cells.map(c => [c.getBoundingClientRect().height, "
        "parseFloat(getComputedStyle(c).lineHeight) + parseFloat(getComputedStyle(c).paddingTop)"
        " + parseFloat(getComputedStyle(c).paddingBottom) + 2])"
    )
    assert heights and all(height <= one_line for height, one_line in heights), heights
    overflow = await page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px"


async def test_the_escalation_page_shows_what_the_approver_decides(tmp_path, running_sidecar, browser):
    """Intent, signals, the tool's catalog facts, the full arguments, whether the agent still waits."""
    config = make_config(tmp_path, **{"console.trusted_header": "X-Auth-Request-Email"})
    sidecar = await running_sidecar(config)
    address = sidecar.addresses[0]
    config.console.sidecar = address
    arguments = {"to": ["cfo@example.com"], "subject": "Q3 numbers", "body": "Attached, as discussed.",
                 "password": "hunter2", "amount": 1250}
    signals = {"risk_score": 0.82, "model": "claude-test-1"}
    async with AsyncClient(address) as agent:
        email = await agent.authorize("send_email", arguments, task_id="task-7", signals=signals,
                                      intent="Send the CFO the Q3 numbers she asked for")
        gone = await agent.authorize("delete_repo", {"repo": "acme/legacy"}, intent="clean up")
        waiting = asyncio.create_task(agent.await_decision(email.escalation_id, timeout=120))
        await until_waiting(address, email.escalation_id, waiting)
        runner, port = await start_console(config, "127.0.0.1:0")
        base = f"http://127.0.0.1:{port}"
        try:
            context = await signed_in_as_alice(browser)
            page = await context.new_page()
            await page.goto(f"{base}/escalations/{email.escalation_id}")
            await page.screenshot(path=screenshot_path("console-escalation.png"), full_page=True)
            card = page.locator(f'section[data-escalation-id="{email.escalation_id}"]')
            assert await card.get_by_test_id("intent").inner_text() == "Send the CFO the Q3 numbers she asked for"
            assert await card.get_by_test_id("tool-description").inner_text() == (
                "Send an email on behalf of the organisation.")
            facts = await card.inner_text()
            assert "owner communications" in facts and "risk high" in facts and "reversible no" in facts
            assert "HIGH RISK" in facts.upper() and "IRREVERSIBLE" in facts.upper()
            assert '"risk_score": 0.82' in await card.get_by_test_id("signals").inner_text()
            shown = await card.get_by_test_id("arguments").inner_text()
            assert '"password": "hunter2"' in shown and '"amount": 1250' in shown
            assert await card.get_by_test_id("kept-out").inner_text() == "kept out of the evidence log: password"
            assert (await card.get_by_test_id("agent").inner_text()).startswith("waiting now")

            await page.goto(f"{base}/escalations/{gone.escalation_id}")
            other = page.locator(f'section[data-escalation-id="{gone.escalation_id}"]')
            assert (await other.get_by_test_id("agent").inner_text()).startswith("not waiting")
            assert "developer-experience" in await other.inner_text()

            # the pending list: newest first, the same order as `approvals list` and the API
            await page.goto(base + "/")
            await page.screenshot(path=screenshot_path("console-pending-full.png"), full_page=True)
            order = await page.locator("section.card").evaluate_all("cards => cards.map(c => c.dataset.escalationId)")
            assert order == [gone.escalation_id, email.escalation_id]
            await context.close()
        finally:
            await runner.cleanup()
        waiting.cancel()


async def test_a_form_with_a_tampered_csrf_token_is_refused(tmp_path, running_sidecar, browser):
    config = make_config(tmp_path, **{"console.dev_approver": APPROVER})
    sidecar = await running_sidecar(config)
    config.console.sidecar = sidecar.addresses[0]
    async with AsyncClient(sidecar.addresses[0]) as agent:
        escalated = await agent.authorize("send_email", {"to": "a@example.com", "body": "b"})
    runner, port = await start_console(config, "127.0.0.1:0")
    try:
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{port}/")
        await page.locator("input[name=csrf_token]").evaluate("input => { input.value = '1.' + 'f'.repeat(64) }")
        await page.get_by_role("button", name="Approve").click()
        await page.wait_for_load_state()
        assert "Refused: the CSRF token is not valid for you" in await page.locator(".banner.error").inner_text()
        await page.close()
    finally:
        await runner.cleanup()
    async with ApprovalsClient(sidecar.addresses[0]) as approvals:
        assert (await approvals.get(escalated.escalation_id))["state"] == "pending"


MARKUP = '"><b id="pwn">x</b><img src=x onerror="document.title=\'pwned\'"><form action="https://evil.example">'


async def test_markup_in_what_agents_and_approvers_write_renders_as_text(tmp_path, running_sidecar, browser):
    """HTML in the server, task id, intent, arguments (keys and values), signals and an approver's note is
    shown as the text it is on every page, in a real browser: no element of it exists, no handler runs,
    and the only forms are the console's own."""
    config = make_config(tmp_path, **{"console.trusted_header": "X-Auth-Request-Email"})
    sidecar = await running_sidecar(config)
    address = sidecar.addresses[0]
    config.console.sidecar = address
    arguments = {"to": MARKUP, MARKUP: "key", "nested": {"list": [MARKUP]}}
    async with AsyncClient(address) as agent:
        pending = await agent.authorize("send_email", arguments, task_id=MARKUP[:200], intent=MARKUP,
                                        signals={"why": MARKUP}, server="mail" + MARKUP[:100])
        decided = await agent.authorize("delete_repo", {"repo": MARKUP}, intent=MARKUP)
    assert (pending.outcome, decided.outcome) == ("escalate", "escalate"), pending.reasons
    async with ApprovalsClient(address) as approvals:
        await approvals.deny(decided.escalation_id, approver=APPROVER, note=MARKUP + "\n" + MARKUP)
    runner, port = await start_console(config, "127.0.0.1:0")
    base = f"http://127.0.0.1:{port}"
    try:
        context = await signed_in_as_alice(browser)
        page = await context.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        for path, shown in (("/", 1), (f"/escalations/{pending.escalation_id}", 1),
                            (f"/escalations/{decided.escalation_id}", 0), ("/history", 0)):
            await page.goto(base + path)
            assert await page.locator("#pwn").count() == 0, path
            assert await page.locator("img").count() == 0, path
            assert await page.title() != "pwned", path
            actions = await page.locator("form").evaluate_all("forms => forms.map(f => f.getAttribute('action'))")
            assert actions == [f"/escalations/{pending.escalation_id}/decide"] * shown, (path, actions)
            handlers = await page.evaluate(
                "() => [...document.querySelectorAll('*')].flatMap(e => [...e.attributes].map(a => a.name))"
                ".filter(n => n.startsWith('on'))")
            assert handlers == [], (path, handlers)
            body = await page.locator("main").inner_text()
            assert '<b id="pwn">x</b>' in body, path  # the text itself, readable
        await context.close()
    finally:
        await runner.cleanup()
    assert dialogs == []
