"""Server-rendered HTML of the console.

Every value from outside goes through `text` (or `attr` inside an attribute): hidden characters
(control, bidirectional, zero-width, ... see sidecar/display.py) are shown escaped and the value is
flagged, then the result is HTML-escaped.
"""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape
from typing import Iterable
from urllib.parse import quote

from sidecar.display import FLAG, NOTICE, needs_flag, json_text, value_needs_flag, visible
from sidecar.escalation.cli import agent_presence, catalog_facts, human_duration, kept_out_of_the_log
from sidecar.escalation.client import parse_time
from sidecar.reasons import TOO_LARGE_TO_LIST, parse

CSS = """
:root { --fg:#1d2330; --muted:#5d6678; --line:#d9dee7; --bg:#f5f7fa; --card:#fff;
        --ok:#1d7a46; --no:#b3261e; --warn:#8a5a00; --accent:#2450a6; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg); background:var(--bg); }
header { background:#1d2330; color:#fff; padding:12px 24px; display:flex; gap:24px; align-items:baseline; flex-wrap:wrap; }
header h1 { font-size:18px; margin:0; font-weight:600; }
header nav a { color:#cfd8ea; margin-right:16px; text-decoration:none; }
header nav a.here { color:#fff; font-weight:600; border-bottom:2px solid #fff; }
header .who { margin-left:auto; color:#cfd8ea; font-size:14px; }
main { max-width:1100px; margin:0 auto; padding:20px 24px 48px; }
main.wide { max-width:1600px; }
.banner { padding:10px 14px; border-radius:6px; margin-bottom:16px; border:1px solid; }
.banner.ok { background:#e8f5ee; border-color:#9fd3b5; color:var(--ok); }
.banner.error { background:#fdecea; border-color:#f0b4ae; color:var(--no); }
.empty { color:var(--muted); padding:32px 0; text-align:center; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:16px 18px; margin-bottom:16px; }
.card h2 { font-size:17px; margin:0 0 6px; display:flex; gap:10px; align-items:baseline; flex-wrap:wrap; }
.card h2 .tool { font-family:ui-monospace,SFMono-Regular,Menlo,monospace; }
.meta { color:var(--muted); font-size:13px; }
.meta b { color:var(--fg); font-weight:600; }
dl { display:grid; grid-template-columns:110px 1fr; gap:4px 12px; margin:10px 0; }
dt { color:var(--muted); }
dd { margin:0; overflow-wrap:anywhere; }
code, pre { font-family:ui-monospace,SFMono-Regular,Menlo,monospace; font-size:13px; }
pre { background:#f0f2f6; border:1px solid var(--line); border-radius:6px; padding:8px 10px; margin:0; max-height:320px; overflow:auto; white-space:pre-wrap; }
ul.reasons { margin:0; padding-left:18px; }
.state { font-size:12px; text-transform:uppercase; letter-spacing:.04em; padding:2px 8px; border-radius:10px; border:1px solid var(--line); }
.state.pending { color:var(--warn); border-color:#e8cf9c; background:#fff8e6; }
.state.approved, .state.used { color:var(--ok); border-color:#9fd3b5; background:#e8f5ee; }
.state.denied { color:var(--no); border-color:#f0b4ae; background:#fdecea; }
.state.expired { color:var(--muted); }
form.decide { display:flex; gap:10px; align-items:flex-end; flex-wrap:wrap; margin-top:12px; border-top:1px solid var(--line); padding-top:12px; }
form.decide label { flex:1 1 320px; display:flex; flex-direction:column; font-size:13px; color:var(--muted); }
form.decide textarea { font:inherit; min-height:38px; padding:6px 8px; border:1px solid var(--line); border-radius:6px; resize:vertical; }
button { font:inherit; font-weight:600; padding:8px 18px; border-radius:6px; border:1px solid transparent; cursor:pointer; }
button.approve { background:var(--ok); color:#fff; }
button.deny { background:#fff; color:var(--no); border-color:var(--no); }
table { width:100%; border-collapse:collapse; background:var(--card); border:1px solid var(--line); border-radius:8px; }
th, td { text-align:left; padding:8px 10px; border-bottom:1px solid var(--line); vertical-align:top; font-size:14px; overflow-wrap:anywhere; }
table.history { table-layout:fixed; }
table.history td { white-space:nowrap; overflow:hidden; text-overflow:ellipsis; overflow-wrap:normal; }
table.history td .note { white-space:nowrap; }
col.c-state { width:110px; } col.c-when { width:80px; } col.c-trace { width:140px; } col.c-link { width:70px; }
col.c-tool { width:14%; } col.c-who { width:21%; } col.c-by { width:17%; }
th { color:var(--muted); font-weight:600; font-size:13px; }
a { color:var(--accent); }
.note { white-space:pre-line; }
.badge { font-size:12px; padding:2px 8px; border-radius:10px; border:1px solid var(--line); color:var(--muted); }
.badge.risk.high, .badge.risk.critical, .badge.irreversible { color:var(--no); border-color:#f0b4ae; background:#fdecea; }
.badge.risk.medium { color:var(--warn); border-color:#e8cf9c; background:#fff8e6; }
.agent.waiting { color:var(--ok); font-weight:600; }
.agent.gone { color:var(--warn); font-weight:600; }
.flag { color:var(--no); font-weight:600; font-size:12px; border:1px solid #f0b4ae; background:#fdecea; border-radius:4px; padding:0 4px; white-space:nowrap; }
"""


def attr(value: object) -> str:
    """A value from outside for an HTML attribute: hidden characters escaped, then HTML-escaped."""
    return escape(visible(value))


def flag_html(what: str = "") -> str:
    return f'<span class="flag" data-testid="hidden-flag" title="{escape(NOTICE)}">{FLAG} {escape(what or NOTICE)}</span>'


def text(value: object) -> str:
    """A value from outside as HTML text: hidden characters escaped and flagged, then HTML-escaped."""
    raw = "" if value is None else str(value)
    return escape(visible(raw)) + (" " + flag_html() if needs_flag(raw) else "")


def clipped(value: object) -> str:
    """A value for a one-line table cell that may be cut with an ellipsis: the flag goes first, so it is
    never the part cut off, and the whole value (escaped) is in the title."""
    raw = "" if value is None else str(value)
    flag = flag_html() + " " if needs_flag(raw) else ""
    return f'{flag}<span title="{attr(raw)}">{escape(visible(raw))}</span>'


def note_html(note: str) -> str:
    """A person's note: its line breaks are kept as line breaks (class note), everything else as `text`."""
    return '<span class="note">' + "\n".join(text(line) for line in note.split("\n")) + "</span>"


def _ts(value: str) -> datetime | None:
    try:
        return parse_time(value)
    except ValueError:
        return None


def age(value: str, now: datetime) -> str:
    moment = _ts(value)
    return human_duration((now - moment).total_seconds()) + " ago" if moment else "-"


def until(value: str, now: datetime) -> str:
    moment = _ts(value)
    if moment is None:
        return "-"
    seconds = (moment - now).total_seconds()
    return "now" if seconds <= 0 else "in " + human_duration(seconds)


def trace_link(trace_id: str, jaeger_url: str, *, short: bool = False) -> str:
    if not trace_id:
        return "-"
    shown = text(trace_id[:12] + "…" if short and not needs_flag(trace_id) else trace_id)
    if not jaeger_url:
        return f'<code title="{attr(trace_id)}">{shown}</code>'
    href = f"{jaeger_url.rstrip('/')}/trace/{quote(trace_id, safe='')}"
    return (f'<a href="{escape(href)}" target="_blank" rel="noopener noreferrer" title="{attr(trace_id)}">'
            f"<code>{shown}</code></a>")


def layout(*, title: str, approver: str, here: str, body: str, pending_count: int | None = None,
           banner: tuple[str, str] | None = None) -> str:
    count = f" ({pending_count})" if pending_count is not None else ""
    nav = (
        f'<a href="/" class="{"here" if here == "pending" else ""}">Pending{count}</a>'
        f'<a href="/history" class="{"here" if here == "history" else ""}">History</a>'
        f'<a href="{"/history" if here == "history" else "/"}">Refresh</a>'
    )
    banner_html = ""
    main_class = ' class="wide"' if here == "history" else ""
    if banner is not None:
        kind, message = banner
        banner_html = f'<div class="banner {escape(kind)}" role="status">{text(message)}</div>'
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{attr(title)}</title><link rel=\"stylesheet\" href=\"/static/console.css\"></head><body>"
        f"<header><h1>agent-sidecar approvals</h1><nav>{nav}</nav>"
        f'<span class="who">signed in as <b data-testid="approver">{text(approver)}</b></span></header>'
        f"<main{main_class}>{banner_html}{body}</main></body></html>"
    )


def _json_block(value: object, what: str, testid: str) -> str:
    flag = flag_html(f"{what} {NOTICE} as JSON escapes") if value_needs_flag(value) else ""
    return f'{flag}<pre data-testid="{testid}">{escape(json_text(value))}</pre>'


def listed_in_summary(escalation: dict) -> bool:
    """Whether the sidecar listed this escalation as its summary (too large for the list, Approvals List):
    its arguments, preview and signals are left out, so it is not decided from where it is listed."""
    withheld = parse(escalation.get("arguments_withheld") or "")
    return withheld is not None and withheld.code == TOO_LARGE_TO_LIST


def _arguments(escalation: dict) -> str:
    """The arguments in full when the sidecar sent them (this approver may decide), else the redacted preview."""
    digest = f'<div class="meta">digest <code>{text(escalation.get("arguments_digest", ""))}</code></div>'
    withheld = escalation.get("arguments_withheld") or ""
    if listed_in_summary(escalation):
        return f'<div class="meta" data-testid="withheld">{text(withheld)}</div>{digest}'
    if escalation.get("arguments") is not None:
        secret = kept_out_of_the_log(escalation["arguments"], escalation.get("arguments_preview"))
        secret_html = (f'<div class="meta" data-testid="kept-out">kept out of the evidence log: '
                       f'{", ".join(f"<code>{text(path)}</code>" for path in secret)}</div>' if secret else "")
        return ('<div class="meta">in full, exactly as the tool will receive them</div>'
                + _json_block(escalation["arguments"], "the arguments", "arguments") + secret_html + digest)
    preview = escalation.get("arguments_preview")
    why = f'<div class="meta" data-testid="withheld">{text(withheld)}</div>' if withheld else ""
    if preview is None:
        return f'<span class="meta">not kept</span>{why}{digest}'
    return ('<div class="meta">redacted preview; in full only to an approver who may decide it</div>'
            + why + _json_block(preview, "the arguments", "arguments-preview") + digest)


def _tool(escalation: dict) -> str:
    """The tool as the catalog described it when policy decided."""
    facts = dict(catalog_facts(escalation))
    if "catalog" in facts:
        return f'<span class="meta">{text(facts["catalog"])}</span>'
    description = text(facts["description"])
    return (f'<div data-testid="tool-description">{description}</div>'
            f'<div class="meta">owner <b>{text(facts["owner"])}</b> · risk <b>{text(facts["risk"])}</b>'
            f' · reversible <b>{text(facts["reversible"])}</b></div>')


def _badges(escalation: dict) -> str:
    entry = escalation.get("tool_catalog")
    if not isinstance(entry, dict):
        return '<span class="badge risk">not in catalog</span>'
    badges = ""
    if isinstance(entry.get("risk"), str) and entry["risk"]:
        badges += f'<span class="badge risk {attr(entry["risk"])}">{text(entry["risk"])} risk</span>'
    if entry.get("reversible") is False:
        badges += '<span class="badge irreversible">irreversible</span>'
    return badges


def _signals(escalation: dict) -> str:
    signals = escalation.get("signals")
    if listed_in_summary(escalation):
        return '<span class="meta">left out of this list, with the arguments</span>'
    if not signals:
        return '<span class="meta">none sent</span>'
    return _json_block(signals, "the signals", "signals")


def _agent(escalation: dict, now: datetime) -> str:
    waiting = escalation.get("agent_waiting") and escalation["state"] == "pending"
    kind = "waiting" if waiting else "gone" if escalation["state"] == "pending" else "idle"
    return f'<span class="agent {kind}" data-testid="agent">{text(agent_presence(escalation, now))}</span>'


def _reasons(reasons: Iterable[str]) -> str:
    items = "".join(f"<li>{text(r)}</li>" for r in reasons)
    return f'<ul class="reasons">{items}</ul>'


def _who(escalation: dict) -> str:
    who = f"<code>{text(escalation['subject'])}</code>"
    if escalation.get("delegation"):
        chain = " → ".join(f"<code>{text(d)}</code>" for d in escalation["delegation"])
        who += f'<div class="meta">on behalf of {chain}</div>'
    return who


def escalation_card(escalation: dict, *, now: datetime, jaeger_url: str, csrf_token: str, decidable: bool) -> str:
    eid = escalation["escalation_id"]
    state = escalation["state"]
    tool = text(escalation["tool"])
    server = f' <span class="meta">on {text(escalation["server"])}</span>' if escalation.get("server") else ""
    timing = f'created <b title="{attr(escalation["created_at"])}">{age(escalation["created_at"], now)}</b>'
    if state == "pending":
        timing += f' · expires <b title="{attr(escalation["expires_at"])}">{until(escalation["expires_at"], now)}</b>'
    rows = [
        ("agent", _agent(escalation, now)),
        ("tool", _tool(escalation)),
        ("who", _who(escalation)),
        ("task", f"<code>{text(escalation['task_id'])}</code>" if escalation.get("task_id") else "-"),
        ("intent", f'<span data-testid="intent">{text(escalation["intent"])}</span>'
         if escalation.get("intent") else '<span class="meta">none given</span>'),
        ("why", _reasons(escalation.get("reasons", ()))),
        ("signals", _signals(escalation)),
        ("arguments", _arguments(escalation)),
        ("trace", trace_link(escalation.get("trace_id", ""), jaeger_url)),
    ]
    if escalation.get("approver"):
        decided = f"{text(escalation['approver'])} <span class=\"meta\">{age(escalation['decided_at'], now)}</span>"
        rows.append(("decided by", decided))
    if escalation.get("note"):
        rows.append(("note", note_html(escalation["note"])))
    details = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in rows)
    form = ""
    if decidable and state == "pending" and listed_in_summary(escalation):
        form = (f'<p class="decide">Too large to list with the others: <a href="/escalations/{quote(eid, safe="")}">'
                "open it</a> to read it whole and decide.</p>")
    elif decidable and state == "pending":
        action = f"/escalations/{quote(eid, safe='')}"
        form = (
            f'<form class="decide" method="post" action="{escape(action)}/decide">'
            f'<input type="hidden" name="csrf_token" value="{escape(csrf_token)}">'
            f'<label>Note (kept with your decision and in the evidence log)'
            f'<textarea name="note" maxlength="2000" rows="1" aria-label="note for {attr(eid)}"></textarea></label>'
            '<button class="approve" type="submit" name="decision" value="approve">Approve</button>'
            '<button class="deny" type="submit" name="decision" value="deny">Deny</button>'
            "</form>"
        )
    return (
        f'<section class="card" id="{attr(eid)}" data-escalation-id="{attr(eid)}" data-state="{attr(state)}">'
        f'<h2><span class="tool">{tool}</span>{server}<span class="state {attr(state)}">{text(state)}</span>'
        f"{_badges(escalation)}</h2>"
        f'<div class="meta">{timing} · <a href="/escalations/{quote(eid, safe="")}"><code>{text(eid)}</code></a></div>'
        f"<dl>{details}</dl>{form}</section>"
    )


def pending_page(escalations: list[dict], *, approver: str, jaeger_url: str, csrf_token: str,
                 banner: tuple[str, str] | None = None) -> str:
    now = datetime.now(timezone.utc)
    if escalations:
        body = "".join(
            escalation_card(e, now=now, jaeger_url=jaeger_url, csrf_token=csrf_token, decidable=True)
            for e in escalations
        )
    else:
        body = '<p class="empty">Nothing is waiting for a decision.</p>'
    return layout(title="Pending approvals", approver=approver, here="pending", body=body,
                  pending_count=len(escalations), banner=banner)


def detail_page(escalation: dict, *, approver: str, jaeger_url: str, csrf_token: str,
                banner: tuple[str, str] | None = None) -> str:
    now = datetime.now(timezone.utc)
    body = escalation_card(escalation, now=now, jaeger_url=jaeger_url, csrf_token=csrf_token, decidable=True)
    return layout(title=f"Escalation {escalation['escalation_id']}", approver=approver, here="", body=body, banner=banner)


def history_page(escalations: list[dict], *, approver: str, jaeger_url: str) -> str:
    now = datetime.now(timezone.utc)
    if not escalations:
        body = '<p class="empty">No decided escalations yet.</p>'
    else:
        rows = []
        for e in escalations:
            when = e["decided_at"] or e["expires_at"]
            tool = clipped(e["tool"]) + (f' <span class="meta">on {clipped(e["server"])}</span>' if e["server"] else "")
            note = e["note"]
            flag = flag_html() + " " if needs_flag(note) else ""
            rows.append(
                f'<tr data-escalation-id="{attr(e["escalation_id"])}" data-state="{attr(e["state"])}">'
                f'<td><span class="state {attr(e["state"])}">{text(e["state"])}</span></td>'
                f'<td><code>{tool}</code></td><td><code>{clipped(e["subject"])}</code></td>'
                f'<td>{clipped(e["approver"]) if e["approver"] else "-"}</td>'
                f'<td title="{attr(when)}">{age(when, now)}</td>'
                f'<td title="{attr(note)}">{flag}{note_html(note)}</td>'
                f'<td>{trace_link(e["trace_id"], jaeger_url, short=True)}</td>'
                f'<td><a href="/escalations/{quote(e["escalation_id"], safe="")}">details</a></td></tr>'
            )
        columns = "".join(f'<col class="c-{name}">' for name in ("state", "tool", "who", "by", "when", "note",
                                                                 "trace", "link"))
        body = (
            f'<table class="history"><colgroup>{columns}</colgroup><thead><tr><th>state</th><th>tool</th><th>who</th>'
            "<th>decided by</th><th>when</th><th>note</th><th>trace</th><th></th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>"
        )
    return layout(title="Approval history", approver=approver, here="history", body=body)


def error_page(status_text: str, message: str, *, approver: str = "") -> str:
    body = f'<div class="banner error" role="alert">{text(message)}</div><p><a href="/">Back to pending approvals</a></p>'
    return layout(title=status_text, approver=approver or "nobody", here="", body=body)
