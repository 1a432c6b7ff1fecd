"""What a human reads is what will run (issue 11 §6): hidden characters are shown escaped and flagged.

The issue's example: an escalation whose task_id is `t-1\\x1b[1A\\r\\x1b[2Ktool         create_ticket`
made `approvals show` print a fake `tool create_ticket` line over the real `send_email`. Variants
covered: C0 (ESC, CR, LF, NUL, BEL), DEL, C1 (CSI U+009B, NEL), bidi controls (U+202E, U+2066, U+200F,
U+061C), zero-width (U+200B, U+2060, U+FEFF), soft hyphen, tag characters (U+E0041), variation
selectors (U+FE0F, U+E0100), Hangul fillers, line/paragraph separators, odd spaces (U+00A0, U+3000),
and values posing as escaped or flagged text; in keys and values of arguments, task ids, servers,
tool names, approver names, notes and reasons; on every surface: `approvals list|show` (and
`--json`), `approve`, the console's pending/detail/history pages, `evidence show` (table and
`--json`), and the webhook's payload.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.client import AsyncClient
from sidecar.console import pages
from sidecar.console.app import start_console
from sidecar.display import FLAG, cell, exact_json, hidden, json_safe, json_text, needs_flag, visible
from sidecar.escalation import EscalationRecord
from sidecar.escalation.cli import format_detail, format_table
from sidecar.escalation.notify import WebhookNotifier, chat
from sidecar.evidence.show import Filter, iter_lines, show
from tests.conftest import REPO
from tests.doubles.escalation import ALICE, make_config
from tests.test_escalation_webhook import Receiver

EXAMPLE_TASK = "t-1\x1b[1A\r\x1b[2Ktool         create_ticket"
HIDDEN = ["\x1b", "\r", "\n", "\x00", "\x07", "\x7f", "\x9b", "\x85", "\u202e", "\u2066", "\u200f", "\u061c",
          "\u200b", "\u2060", "\ufeff", "\u00ad", "\U000e0041", "\ufe0f", "\U000e0100", "\u3164", "\u115f",
          "\u2028", "\u2029", "\u00a0", "\u3000", "\u034f", "\u2800", "\ud800"]
SHOWN_AS_IS = ["send_email", "café", "日本語", "emoji 🔥", "C:\\temp\\x1b is text", "a b"]


def no_hidden(text: str, *, newlines: bool = True) -> bool:
    """True when nothing in the text is hidden (line breaks of the output's own layout allowed)."""
    return not any(hidden(ch) for ch in (text.replace("\n", "") if newlines else text))


hidden_text = st.builds(lambda a, h, b: a + h + b, st.text(max_size=8), st.sampled_from(HIDDEN), st.text(max_size=8))
any_text = st.one_of(hidden_text, st.text(max_size=20), st.sampled_from([*SHOWN_AS_IS, FLAG + "x", EXAMPLE_TASK]))


@settings(max_examples=500, deadline=None)
@given(a=any_text, b=any_text)
def test_visible_hides_nothing_and_two_values_never_read_the_same(a, b):
    for text in (a, b):
        assert no_hidden(visible(text), newlines=False) and no_hidden(cell(text), newlines=False)
        assert visible(text) == text if not needs_flag(text) else visible(text) != text or FLAG in text
        assert cell(text).startswith(FLAG) == needs_flag(text)
        assert json.loads(json_text({text: [text]})) == {text: [text]} and no_hidden(json_text({text: text}))
        assert json.loads(exact_json(text)) == text and exact_json(text).isascii() and "\x7f" not in exact_json(text)
    if a != b:
        assert cell(a) != cell(b)


@pytest.mark.parametrize("text", SHOWN_AS_IS)
def test_ordinary_text_is_shown_unchanged(text):
    assert visible(text) == text == cell(text) and json.loads(json_text(text)) == text


def test_the_escapes_people_read():
    assert visible(EXAMPLE_TASK) == "t-1\\x1b[1A\\r\\x1b[2Ktool         create_ticket"
    assert visible("pay\u202eusd") == "pay\\u202eusd" and visible("x\U000e0041") == "x\\U000e0041"
    assert visible("C:\\dir\x00") == "C:\\\\dir\\x00"  # once escaped, a backslash is doubled


def row(text: str) -> dict:
    """An escalation as the Approvals API gives it, with `text` in every string field people read."""
    return {
        "escalation_id": "esc-" + "a" * 32, "state": "pending", "subject": "spiffe://dev.local/agent",
        "subject_source": "dev", "delegation": ["spiffe://dev.local/" + text], "tool": "send_" + text,
        "server": text, "arguments_digest": "sha256:" + "0" * 64,
        "arguments_preview": {text: text, "nested": [{"k" + text: 1}]}, "task_id": text, "intent": text,
        "call_id": text, "decision_id": "d", "reasons": ["high_risk_tool: " + text, text + ": odd"],
        "policy_revision": "rev", "trace_id": "0" * 32, "created_at": "2026-11-29T10:00:00.000000Z",
        "expires_at": "2026-11-29T10:15:00.000000Z", "approver": "email:" + text, "approver_via": "",
        "decided_at": "2026-11-29T10:01:00.000000Z", "note": text, "use_by": "", "used_at": "",
        "used_by_decision": "", "sidecar": "s",
    }


@settings(max_examples=300, deadline=None)
@given(text=hidden_text)
def test_every_renderer_escapes_and_flags_every_field(text):
    escalation = row(text)
    detail = format_detail(escalation)
    assert no_hidden(detail) and detail.startswith("WARNING [!] delegation, tool, server, arguments_preview")
    for label in ("tool", "server", "task", "note", "decided by"):
        [line] = [line for line in detail.splitlines() if line.startswith(label + " ")]
        assert line.endswith(f"{FLAG} holds control or invisible characters, shown escaped"), line
    reasons = [line for line in detail.splitlines() if line.startswith("  - ")]
    assert len(reasons) == 2 and all(line.endswith(f"{FLAG} holds control or invisible characters, shown escaped")
                                     for line in reasons)
    table = format_table([escalation])
    assert no_hidden(table) and FLAG + visible("send_" + text) in table
    for page in (pages.pending_page([escalation], approver=ALICE, jaeger_url="", csrf_token="t"),
                 pages.detail_page(escalation, approver=ALICE, jaeger_url="", csrf_token="t"),
                 pages.history_page([escalation], approver=ALICE, jaeger_url="")):
        assert no_hidden(page) and 'data-testid="hidden-flag"' in page
    notifier = WebhookNotifier("http://127.0.0.1:1/")
    record = EscalationRecord(
        id="esc-1", fingerprint="f", subject="spiffe://dev.local/agent", subject_source="dev", delegation=(),
        tool="send_" + text, server="", arguments_digest="sha256:0", arguments_preview={text: text}, task_id=text,
        intent="", call_id="c", decision_id="d", reasons=("high_risk_tool: x",), policy_revision="r",
        trace_id="t", span_id="s", created_at=0.0, expires_at=1.0)
    payload = notifier.payload(record)
    assert no_hidden(payload["text"]) and payload["text"].startswith(chat("send_" + text) + " by ")
    assert payload["hidden_characters"] == ["tool", "arguments_preview", "task_id"]
    assert payload["escalation"]["task_id"] == text  # programs get the exact value


async def cli(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "sidecar", *args, cwd=REPO,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_the_issue_example_and_variants_on_every_real_surface(tmp_path, running_sidecar):
    hook = await Receiver().start()
    sidecar = await running_sidecar(make_config(tmp_path, **{"escalation.webhook_url": hook.url}))
    address = sidecar.addresses[0]
    approver = "email:alice\u3164@example.org"  # a Hangul filler: printable, so a valid approver name
    note = "fine\rapproved by cfo\x9b2K\u202e\ufe0f"  # the service refuses most C0 controls in notes, not these
    try:
        async with AsyncClient(address) as agent:
            escalated = await agent.authorize(
                "send_email", {"to": "ops@example.com", "body\u200b": "hi\x9b2J", "bcc\u202e": ["x@evil.example"]},
                task_id=EXAMPLE_TASK, server="mail\u2066srv", intent="report\u2028\u2029",
                signals={"model\u202e": "x\x1b[2J", "risk_score": 0.5})
            denied = await agent.authorize("search_docs\u3164", {"q": "x"}, task_id="t\u202e")
        assert escalated.outcome == "escalate" and denied.outcome == "deny"
        eid = escalated.escalation_id
        await sidecar.escalations.notifier.drain(5)

        shown = await cli("approvals", "show", eid, "--address", address)
        assert no_hidden(shown)
        assert [line for line in shown.splitlines() if line.startswith("tool")] == ["tool         send_email"]
        assert ("task         t-1\\x1b[1A\\r\\x1b[2Ktool         create_ticket   [!] holds control or invisible "
                "characters, shown escaped") in shown
        assert shown.startswith("WARNING [!] server, arguments_preview, task_id, intent, signals holds")
        assert '"bcc\\u202e": [' in shown and '"body\\u200b": "hi\\u009b2J"' in shown
        assert "intent       report\\u2028\\u2029   [!] holds" in shown
        assert '"model\\u202e": "x\\u001b[2J"' in shown and "[!] the signals holds" in shown
        in_full = await cli("approvals", "show", eid, "--address", address, "--approver", ALICE)
        assert no_hidden(in_full) and "WARNING [!] server, arguments_preview, arguments, task_id," in in_full
        assert "in full, exactly as the tool will receive them:" in in_full
        assert "[!] the arguments holds" in in_full and '"body\\u200b": "hi\\u009b2J"' in in_full
        listed = await cli("approvals", "list", "--address", address)
        assert no_hidden(listed) and "send_email ([!]mail\\u2066srv)" in listed
        exact = json.loads(await cli("approvals", "show", eid, "--address", address, "--json"))
        assert (exact["task_id"], exact["server"]) == (EXAMPLE_TASK, "mail\u2066srv")
        lines = (await cli("approvals", "list", "--address", address, "--json")).splitlines()
        assert all(line.isascii() for line in lines) and json.loads(lines[0])["task_id"] == EXAMPLE_TASK

        runner, port = await start_console(make_config(tmp_path, **{"console.dev_approver": ALICE,
                                                                    "console.sidecar": address}), "127.0.0.1:0")
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/") as response:
                    pending = await response.text()
                approved = await cli("approvals", "approve", eid, "--approver", approver, "--note", note,
                                     "--address", address)
                assert no_hidden(approved) and f"as {FLAG}email:alice\\u3164@example.org" in approved
                async with http.get(f"http://127.0.0.1:{port}/escalations/{eid}") as response:
                    detail = await response.text()
                async with http.get(f"http://127.0.0.1:{port}/history") as response:
                    history = await response.text()
        finally:
            await runner.cleanup()
        for page in (pending, detail, history):
            assert no_hidden(page) and 'data-testid="hidden-flag"' in page
        assert "t-1\\x1b[1A\\r\\x1b[2Ktool         create_ticket" in pending
        assert "in full, exactly as the tool will receive them" in pending  # alice may decide it
        assert "&quot;bcc\\u202e&quot;" in pending and "&quot;model\\u202e&quot;: &quot;x\\u001b[2J&quot;" in pending
        assert "report\\u2028\\u2029" in pending
        assert "email:alice\\u3164@example.org" in detail and "fine\\rapproved by cfo\\x9b2K\\u202e\\ufe0f" in history

        after = await cli("approvals", "show", eid, "--address", address)
        assert no_hidden(after) and "decided by   email:alice\\u3164@example.org" in after

        [(_, body)] = hook.requests
        assert body.isascii()
        payload = json.loads(body)
        assert payload["escalation"]["task_id"] == EXAMPLE_TASK and no_hidden(payload["text"])
        assert payload["hidden_characters"] == ["server", "arguments_preview", "task_id", "intent", "signals"]
        assert "arguments" not in payload["escalation"]  # never the unredacted arguments
        assert payload["text"].startswith("send_email on [!]mail\\u2066srv by spiffe://dev.local/agent needs approval")

        table, as_json = io.StringIO(), io.StringIO()
        show(tmp_path / "evidence", Filter(), as_json=False, out=table)
        show(tmp_path / "evidence", Filter(), as_json=True, out=as_json)
        assert no_hidden(table.getvalue()) and "[!]search_docs\\u3164" in table.getvalue()
        assert no_hidden(as_json.getvalue())
        logged = [record for _line, record in iter_lines(tmp_path / "evidence")]  # the log's own lines, parsed
        assert [json.loads(line) for line in as_json.getvalue().split("\n")[:-1]] == logged
        assert any(r.get("intent") == "report\u2028\u2029" for r in logged)
    finally:
        await hook.stop()


def test_json_safe_keeps_the_value_of_a_canonical_line():
    line = json.dumps({"a\u202e": "x\x7f\u2028\U000e0041"}, ensure_ascii=False, separators=(",", ":"))
    assert json.loads(json_safe(line)) == json.loads(line) and no_hidden(json_safe(line), newlines=False)


async def test_console_logs_show_request_values_escaped(tmp_path, running_sidecar, caplog):
    sidecar = await running_sidecar(make_config(tmp_path))
    runner, port = await start_console(make_config(tmp_path, **{"console.dev_approver": ALICE,
                                                                "console.sidecar": sidecar.addresses[0]}), "127.0.0.1:0")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/escalations/esc-%1B%5B2K%0Dapproved%E2%80%AE/decide",
                                 data={"decision": "approve\x1b[1A"}, allow_redirects=False) as response:
                assert response.status == 403
    finally:
        await runner.cleanup()
    [line] = [r.getMessage() for r in caplog.records if "csrf" in r.getMessage()]
    assert no_hidden(line, newlines=False) and "of esc-\\x1b[2K\\rapproved\\u202e by" in line
    assert "refused approve\\x1b[1A of" in line


# Found by the redteam review: values that hold no hidden character yet read as another value were
# shown unchanged, so "two different values never read the same" did not hold. Canonically equivalent
# text (an `e` and U+0301 reads as U+00E9, KELVIN SIGN as K) and a word mixing scripts whose letters
# look alike (`exаmple.com` with a Cyrillic а) read exactly as the value an approver expects.
READS_AS = [
    ("cfo@cafe\u0301.fr", "cfo@caf\u00e9.fr"),  # decomposed vs composed: canonically equivalent
    ("\u212aelvin", "Kelvin"),  # KELVIN SIGN
    ("5 \u2126", "5 \u03a9"),  # OHM SIGN, GREEK CAPITAL OMEGA
    ("\u1112\u1161\u11ab", "\ud55c"),  # Hangul jamo vs the syllable
    ("\u0bc6\u0bbe", "\u0bca"),  # Tamil two-part vowel sign vs its precomposed form
    ("cfo@ex\u0430mple.com", "cfo@example.com"),  # Cyrillic а in a Latin word
    ("p\u0430yp\u0430l", "paypal"),
    ("\u03bfpenai.com", "openai.com"),  # Greek omicron
    ("\uff45xample", "example"),  # a fullwidth e in a Latin word
    ("\U0001d41example", "example"),  # MATHEMATICAL BOLD SMALL E
]
STILL_AS_IS = ["café", "naïve Zürich", "Привет мир", "Ελληνικά", "日本語のテキスト", "한국어", "\u0b95\u0bca",
               "Grüße, Мария and Γιώργος", "e\u0301"[:1]]


@pytest.mark.parametrize("spoof, real", READS_AS)
def test_a_value_that_reads_as_another_is_flagged_and_shown_apart(spoof, real):
    assert spoof != real and needs_flag(spoof)
    assert cell(spoof).startswith(FLAG) and cell(spoof) != cell(real)
    assert visible(spoof) != visible(real) and "\\u" in visible(spoof).replace("\\U", "\\u")
    shown = json_text({"to": spoof})
    assert json.loads(shown) == {"to": spoof} and "\\u" in shown  # still the same value, readably apart
    page = pages.detail_page({**row("x"), "arguments": {"to": spoof}, "task_id": spoof}, approver=ALICE,
                             jaeger_url="", csrf_token="t")
    assert 'data-testid="hidden-flag"' in page and spoof not in page


@pytest.mark.parametrize("text", STILL_AS_IS)
def test_ordinary_text_in_any_script_is_still_shown_unchanged(text):
    assert not needs_flag(text) and visible(text) == text == cell(text) and json.loads(json_text(text)) == text
