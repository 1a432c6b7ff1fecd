"""The console end to end in a real headless Chromium: load the page, approve one, deny one.

Debian's `chromium` package (installed by `make test`), driven by Playwright
for Python through `executable_path`: no browser is downloaded
(`playwright install` is never run). The browser context sends the header
an auth proxy would (X-Auth-Request-Email), so the approver is
email:alice@example.org. A screenshot of each page is saved in the test's
tmp dir (console-*.png).
"""

from __future__ import annotations

import os

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
    runner, port = await start_console(config, "127.0.0.1:0")
    base = f"http://127.0.0.1:{port}"
    try:
        context = await browser.new_context(
            viewport={"width": 1200, "height": 900}, extra_http_headers={"X-Auth-Request-Email": "alice@example.org"}
        )
        page = await context.new_page()
        await page.goto(base + "/")
        await page.screenshot(path=str(tmp_path / "console-pending.png"), full_page=True)
        assert await page.title() == "Pending approvals"
        assert await page.locator('[data-testid="approver"]').inner_text() == APPROVER
        cards = page.locator("section.card")
        assert await cards.count() == 2
        email_card = page.locator(f'section[data-escalation-id="{email.escalation_id}"]')
        repo_card = page.locator(f'section[data-escalation-id="{repo.escalation_id}"]')
        text = await email_card.inner_text()
        assert "send_email" in text and "spiffe://dev.local/agent" in text and "task-42" in text
        assert "high_risk_tool: a human approves this tool" in text and "[REDACTED]" in text and "s3cret" not in text
        assert "expires" in text and "in 14m" in text
        trace = email_card.locator("a[href*='/trace/']")
        assert await trace.get_attribute("href") == f"http://jaeger.example:16686/trace/{email.trace_id}"

        await email_card.locator("textarea[name=note]").fill("checked with finance")
        await email_card.get_by_role("button", name="Approve").click()
        await page.wait_for_url(f"{base}/?approved={email.escalation_id}")
        assert f"Approved {email.escalation_id}" in await page.locator(".banner.ok").inner_text()
        assert await page.locator("section.card").count() == 1

        await repo_card.locator("textarea[name=note]").fill("not during the freeze")
        await repo_card.get_by_role("button", name="Deny").click()
        await page.wait_for_url(f"{base}/?denied={repo.escalation_id}")
        assert "Nothing is waiting for a decision." in await page.locator("main").inner_text()
        await page.screenshot(path=str(tmp_path / "console-after.png"), full_page=True)

        await page.get_by_role("link", name="History").click()
        await page.wait_for_url(f"{base}/history")
        rows = page.locator("tbody tr")
        assert await rows.count() == 2
        history = await page.locator("table").inner_text()
        assert "APPROVED" in history and "DENIED" in history and "checked with finance" in history
        assert APPROVER in history
        await page.screenshot(path=str(tmp_path / "console-history.png"), full_page=True)
        await context.close()
    finally:
        await runner.cleanup()

    async with ApprovalsClient(address) as approvals:
        approved = await approvals.get(email.escalation_id)
        denied = await approvals.get(repo.escalation_id)
    assert (approved["state"], approved["approver"], approved["note"]) == ("approved", APPROVER, "checked with finance")
    assert (denied["state"], denied["approver"], denied["note"]) == ("denied", APPROVER, "not during the freeze")
    async with AsyncClient(address) as agent:
        assert (await agent.authorize("send_email", email_args, task_id="task-42",
                                      escalation_id=email.escalation_id)).outcome == "allow"
        assert (await agent.authorize("delete_repo", {"repo": "acme/legacy-billing"},
                                      escalation_id=repo.escalation_id)).outcome == "deny"
    kinds = [(r["kind"], r["outcome"], r.get("approver")) for r in records(tmp_path / "evidence")
             if r["kind"] in ("approval", "human_denial")]
    assert kinds == [("approval", "approved", APPROVER), ("human_denial", "denied", APPROVER)]


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
