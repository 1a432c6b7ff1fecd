"""The approvers' console over HTTP: identity from the trusted header, CSRF, refusals shown, history.

A real sidecar (gRPC) and the real console (aiohttp on 127.0.0.1), driven
with an HTTP client. tests/test_console_browser.py drives it in Chromium.
"""

from __future__ import annotations

import re

import aiohttp
import pytest

from sidecar.client import AsyncClient
from sidecar.console.app import ConsoleError, build_app, start_console
from sidecar.console.csrf import CsrfError, CsrfTokens
from sidecar.escalation.client import ApprovalsClient
from tests.conftest import BIG_CALLS
from tests.doubles.escalation import ALICE, make_config, records

HEADER = "X-Auth-Request-Email"


@pytest.fixture
async def setup(tmp_path, running_sidecar):
    """(sidecar address, start_console(**console settings) -> base URL)."""
    runners = []
    sidecar = await running_sidecar(make_config(tmp_path, **BIG_CALLS))  # the big-escalations test's
    address = sidecar.addresses[0]

    async def console(**settings) -> str:
        config = make_config(tmp_path, **{f"console.{k}": v for k, v in settings.items()})
        config.console.sidecar = settings.get("sidecar", address)
        runner, port = await start_console(config, "127.0.0.1:0")
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield address, console
    for runner in runners:
        await runner.cleanup()


async def escalate(address: str, tool: str = "send_email", **arguments) -> str:
    async with AsyncClient(address) as agent:
        result = await agent.authorize(tool, arguments or {"to": "cfo@example.com", "body": "hi"})
    assert result.outcome == "escalate", result.reasons
    return result.escalation_id


def token_in(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "no CSRF token in the page"
    return match.group(1)


async def state_of(address: str, escalation_id: str) -> dict:
    async with ApprovalsClient(address) as approvals:
        return await approvals.get(escalation_id)


async def test_dev_mode_page_approve_and_csrf_refusals(setup, tmp_path):
    address, console = setup
    base = await console(dev_approver=ALICE, jaeger_url="http://jaeger.example:16686")
    eid = await escalate(address, to="cfo@example.com", body="<script>alert(1)</script>", password="pw")
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as response:
            page = await response.text()
            assert response.status == 200
            assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
            assert response.headers["X-Frame-Options"] == "DENY" and response.headers["Cache-Control"] == "no-store"
        assert eid in page and "send_email" in page and "spiffe://dev.local/agent" in page
        assert "high_risk_tool: a human approves this tool" in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page  # escaped
        # alice may decide it: the arguments in full, as the tool will receive them (the password too)
        assert "in full, exactly as the tool will receive them" in page
        assert "&quot;password&quot;: &quot;pw&quot;" in page and "[REDACTED]" not in page
        assert "http://jaeger.example:16686/trace/" in page and "expires <b" in page
        assert ALICE in page
        token = token_in(page)
        decide = f"{base}/escalations/{eid}/decide"

        forged = CsrfTokens(b"not-the-console-secret-at-all!!").issue(ALICE)
        bad_forms = {
            "no token": {"decision": "approve"},
            "garbage token": {"decision": "approve", "csrf_token": "123.abc"},
            "forged token": {"decision": "approve", "csrf_token": forged},
        }
        for name, form in bad_forms.items():
            async with http.post(decide, data=form, allow_redirects=False) as response:
                assert response.status == 403, name
                assert "Refused:" in await response.text() and "Nothing was changed" in await response.text()
        async with http.post(decide, data={"decision": "approve", "csrf_token": token}, allow_redirects=False,
                             headers={"Origin": "https://evil.example"}) as response:
            assert response.status == 403 and "another origin" in await response.text()
        async with http.post(decide, data={"decision": "approve", "csrf_token": token}, allow_redirects=False,
                             headers={"Sec-Fetch-Site": "cross-site"}) as response:
            assert response.status == 403
        assert (await state_of(address, eid))["state"] == "pending"  # nothing changed

        async with http.post(decide, data={"decision": "approve", "csrf_token": token, "note": "ok\r\nchecked"},
                             allow_redirects=False, headers={"Origin": base}) as response:
            assert response.status == 303 and response.headers["Location"] == f"/?approved={eid}"
        after = await state_of(address, eid)
        assert (after["state"], after["approver"], after["note"]) == ("approved", ALICE, "ok\nchecked")

        # deciding again: the sidecar's refusal is shown, nothing changes
        async with http.post(decide, data={"decision": "deny", "csrf_token": token}, allow_redirects=False) as r:
            assert r.status == 409 and "already_decided" in await r.text()
        async with http.get(base + "/history") as response:
            history = await response.text()
        assert eid in history and "ok\nchecked" in history and 'data-state="approved"' in history
        async with http.get(f"{base}/escalations/{eid}") as response:
            assert response.status == 200 and "approved" in await response.text()
        async with http.get(f"{base}/escalations/esc-{'0' * 32}") as response:
            assert response.status == 404 and "escalation_unknown" in await response.text()
    approvals = [r for r in records(tmp_path / "evidence") if r["kind"] in ("approval", "human_denial")]
    assert [(r["kind"], r["outcome"]) for r in approvals] == [("approval", "approved"), ("human_denial", "refused")]


async def test_who_may_not_decide_reads_the_redacted_preview_and_why(setup):
    address, console = setup
    base = await console(dev_approver="spiffe://dev.local/agent")  # the call's own subject
    eid = await escalate(address, to="cfo@example.com", body="b", password="pw")
    async with aiohttp.ClientSession() as http:
        for path in ("/", f"/escalations/{eid}"):
            async with http.get(base + path) as response:
                page = await response.text()
            assert "&quot;password&quot;: &quot;[REDACTED]&quot;" in page and "&quot;pw&quot;" not in page
            assert "redacted preview; in full only to an approver who may decide it" in page
            assert "self_approval: spiffe://dev.local/agent cannot decide" in page


async def test_trusted_header_names_the_approver(setup):
    address, console = setup
    base = await console(trusted_header=HEADER, approver_prefix="email:")
    eid = await escalate(address, "delete_repo", repo="acme/old")
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as response:
            assert response.status == 401 and "sign-in proxy" in await response.text()
        async with http.get(base + "/", headers=[(HEADER, "a@x.org"), (HEADER, "b@x.org")]) as response:
            assert response.status == 401  # a repeated header is not trusted
        async with http.get(base + "/", headers={HEADER: "has space@x.org"}) as response:
            assert response.status == 401
        # a proxy that joins a client's header with its own sends one line holding both: not one person
        async with http.get(base + "/", headers={HEADER: "eve@evil.org,bob@example.org"}) as response:
            assert response.status == 401 and "cannot approve" in await response.text()
        bob = {HEADER: "bob@example.org"}
        async with http.get(base + "/", headers=bob) as response:
            page = await response.text()
        assert "email:bob@example.org" in page
        token = token_in(page)
        # the token is bound to bob: carol cannot use it
        carol = {HEADER: "carol@example.org"}
        async with http.post(f"{base}/escalations/{eid}/decide", headers=carol, allow_redirects=False,
                             data={"decision": "deny", "csrf_token": token}) as response:
            assert response.status == 403 and "not valid for you" in await response.text()
        async with http.post(f"{base}/escalations/{eid}/decide", headers=bob, allow_redirects=False,
                             data={"decision": "deny", "csrf_token": token, "note": "not now"}) as response:
            assert response.status == 303
    after = await state_of(address, eid)
    assert (after["state"], after["approver"], after["note"]) == ("denied", "email:bob@example.org", "not now")


async def test_sidecar_down_is_shown_not_crashed(setup):
    _, console = setup
    base = await console(dev_approver=ALICE, sidecar="127.0.0.1:1")
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as response:
            assert response.status == 502 and "The sidecar could not be reached" in await response.text()
        async with http.get(base + "/healthz") as response:
            assert response.status == 200


def test_console_needs_an_identity_source():
    with pytest.raises(ConsoleError) as info:
        build_app(None, csrf=CsrfTokens(b"x" * 32))  # type: ignore[arg-type]
    assert "console.trusted_header" in str(info.value)


def test_csrf_tokens_expire_and_bind_to_the_approver():
    tokens = CsrfTokens(b"s" * 32, max_age=60)
    token = tokens.issue(ALICE, now=1000)
    tokens.check(token, ALICE, now=1030)
    for approver, now, why in ((ALICE, 1061, "expired"), ("email:eve@example.org", 1030, "not valid for you")):
        with pytest.raises(CsrfError) as info:
            tokens.check(token, approver, now=now)
        assert why in str(info.value)


def _multipart(**fields) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        for one in value if isinstance(value, list) else [value]:
            if isinstance(one, bytes):
                form.add_field(name, one, filename=f"{name}.txt")
            else:
                form.add_field(name, one)
    return form


@pytest.mark.parametrize("case", [
    "superscript digits in the token", "arabic-indic digits in the token", "multipart without a boundary",
    "note sent as a file", "token sent as a file", "decision given twice", "note given twice", "token given twice",
])
async def test_a_decision_form_the_console_cannot_read_one_way_is_refused_and_nothing_changes(setup, case, caplog):
    """A form field that is not plain text, is given twice, or a token with digits `int` reads another way
    (or not at all) is refused with the console's refusal page, headers included, and never reaches the sidecar:
    a decision must not go through with its note silently dropped, nor pick one of two answers."""
    address, console = setup
    base = await console(dev_approver=ALICE)
    eid = await escalate(address)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as response:
            token = token_in(await response.text())
        forms = {
            "superscript digits in the token": {"decision": "approve", "csrf_token": "\u00b2." + "0" * 64},
            "arabic-indic digits in the token": {"decision": "approve", "csrf_token": "\u0661\u0662." + "0" * 64},
            "multipart without a boundary": b"decision=approve",
            "note sent as a file": _multipart(decision="approve", csrf_token=token, note=b"checked"),
            "token sent as a file": _multipart(decision="approve", csrf_token=token.encode()),
            "decision given twice": _multipart(decision=["deny", "approve"], csrf_token=token),
            "note given twice": _multipart(decision="approve", csrf_token=token, note=["ok", "NOT ok"]),
            "token given twice": _multipart(decision="approve", csrf_token=[token, token]),
        }
        headers = {"Content-Type": "multipart/form-data"} if case == "multipart without a boundary" else {}
        async with http.post(f"{base}/escalations/{eid}/decide", data=forms[case], headers=headers,
                             allow_redirects=False) as response:
            page = await response.text()
            assert response.status in (400, 403), (case, response.status, page[:300])
            assert "Nothing was changed" in page
            assert response.headers["Cache-Control"] == "no-store" and response.headers["X-Frame-Options"] == "DENY"
    assert (await state_of(address, eid))["state"] == "pending"
    assert any("nothing was sent to the sidecar" in r.getMessage() for r in caplog.records), case


async def test_the_decided_banner_shows_only_what_this_approver_really_decided(setup):
    """`/?approved=<id>` is a link anyone can send: the banner must not tell an approver that a pending
    escalation is approved (or a denied one approved), nor claim someone else's decision as theirs."""
    address, console = setup
    base = await console(trusted_header=HEADER, approver_prefix="email:")
    pending, decided = await escalate(address), await escalate(address, "delete_repo", repo="acme/x")
    bob, carol = {HEADER: "bob@example.org"}, {HEADER: "carol@example.org"}
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/", headers=bob) as response:
            token = token_in(await response.text())
        async with http.post(f"{base}/escalations/{decided}/decide", headers=bob, allow_redirects=False,
                             data={"decision": "deny", "csrf_token": token}) as response:
            assert response.status == 303
            location = response.headers["Location"]
        async with http.get(base + location, headers=bob) as response:
            assert f"Denied {decided}." in await response.text()  # the true banner still shows
        for who, query in ((bob, f"approved={pending}"), (bob, f"denied={pending}"), (bob, f"approved={decided}"),
                           (carol, f"denied={decided}"), (bob, f"approved=esc-{'0' * 32}")):
            async with http.get(f"{base}/?{query}", headers=who) as response:
                page = await response.text()
                assert response.status == 200 and 'role="status"' not in page, (who, query)
                assert "Approved esc-" not in page and "Denied esc-" not in page, (who, query)
    assert (await state_of(address, pending))["state"] == "pending"


async def test_big_escalations_cannot_blind_the_console_and_are_decided_from_their_own_page(setup):
    """Six 800 KB escalations made the pending page a 502 for every approver. Now it lists them all;
    one too large for the list shows as a summary that cannot be decided there (its arguments are
    not on the page), with a link to its own page, which shows it whole with the form."""
    address, console = setup
    base = await console(dev_approver=ALICE)
    small = await escalate(address, to="cfo@example.com", body="small")
    big = [await escalate(address, to=f"x{i}@example.com", body="y" * 800_000) for i in range(6)]
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as response:
            page = await response.text()
        assert response.status == 200 and all(eid in page for eid in [small, *big])
        cards = dict(re.findall(r'data-escalation-id="(esc-[0-9a-f]+)"(.*?)</section>', page, re.S))
        assert 'name="csrf_token"' in cards[small] and "&quot;small&quot;" in cards[small]
        summarized = [eid for eid in big if "too_large_to_list" in cards[eid]]
        assert summarized
        for eid in summarized:
            assert 'name="decision"' not in cards[eid] and "y" * 1000 not in cards[eid]
            assert f'href="/escalations/{eid}"' in cards[eid] and "to read it whole and decide" in cards[eid]
        async with http.get(f"{base}/escalations/{summarized[0]}") as response:
            alone = await response.text()
        assert response.status == 200 and 'value="approve"' in alone and "y" * 800_000 in alone
