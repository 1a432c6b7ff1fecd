"""The approvers' web console: aiohttp.web, server-rendered, a client of the Approvals API.

    GET  /                           pending escalations, newest first, each with Approve / Deny and a note
    GET  /history                    decided, expired and used escalations
    GET  /escalations/{id}           one escalation (webhook notices link here)
    POST /escalations/{id}/decide    decision=approve|deny, note, csrf_token
    GET  /healthz                    "ok"

Who is deciding: the value of `console.trusted_header`, set by the auth proxy
in front (e.g. oauth2-proxy's X-Auth-Request-Email), prefixed with
`console.approver_prefix` (email:alice@example.org). The console must only be
reachable through that proxy, which must strip the header from clients. With
no trusted header the console is in dev mode and everyone is
`console.dev_approver`. The sidecar applies separation of duties, records the
decision and answers refusals; the console shows them. The console names
that person when it reads escalations too, so the sidecar answers only when
that person is among the approvers (403 otherwise), and sends the
unredacted arguments only for escalations that person may decide.

Forms carry an HMAC CSRF token bound to the approver (csrf.py); a POST without
a valid one, or from another origin, is refused (403), logged, and never
reaches the sidecar; so is (400) a form that cannot be read one way. Values
from requests are logged through display.visible, so a path or form field
cannot write terminal escapes into the log.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web

from sidecar.console import pages
from sidecar.console.csrf import CsrfError, CsrfTokens, load_secret
from sidecar.display import visible
from sidecar.escalation import EscalationRefused
from sidecar.escalation.client import ApprovalsClient, ApprovalsError, token_file_metadata
from sidecar.escalation.grpc_api import validate_approver
from sidecar.sockets import tcp_listener

log = logging.getLogger(__name__)

APPROVER_KEY = web.AppKey("approver_settings", dict)
CLIENT_KEY = web.AppKey("approvals_client", ApprovalsClient)
CSRF_KEY = web.AppKey("csrf", CsrfTokens)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
HISTORY_STATES = ("approved", "denied", "expired", "used")


class ConsoleError(Exception):
    """The console cannot start as configured."""


def sidecar_address(config: Any) -> str:
    if config.console.sidecar:
        return config.console.sidecar
    if config.listen.unix:
        return f"unix:{config.listen.unix}"
    return config.listen.tcp


class Unauthenticated(Exception):
    pass


def approver_of(request: web.Request) -> str:
    settings = request.app[APPROVER_KEY]
    header = settings["trusted_header"]
    if not header:
        return settings["dev_approver"]
    values = request.headers.getall(header, [])
    if len(values) != 1 or not values[0].strip():
        raise Unauthenticated(
            f"no signed-in person: the {header} header is missing or repeated. "
            "Open the console through its sign-in proxy."
        )
    try:
        return validate_approver(settings["prefix"] + values[0].strip())
    except EscalationRefused as exc:
        raise Unauthenticated(f"the signed-in identity cannot approve: {exc.message}") from None


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


@web.middleware
async def security(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response = await handler(request)
    except Unauthenticated as exc:
        log.warning("console: refused %s %s from %s: %s", visible(request.method), visible(request.path),
                    request.remote, visible(exc))
        response = _html(pages.error_page("Not signed in", str(exc)), status=401)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "text/html":
            response = _html(pages.error_page(exc.reason, exc.text or exc.reason), status=exc.status)
        else:
            raise
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


async def _pending(request: web.Request, approver: str) -> list[dict]:
    """Pending escalations, newest first (the one order of every list: API, CLI, console)."""
    return await request.app[CLIENT_KEY].list(state="pending", limit=500, approver=approver)


async def _render_pending(request: web.Request, approver: str, banner: tuple[str, str] | None,
                          status: int = 200) -> web.Response:
    try:
        escalations = await _pending(request, approver)
    except ApprovalsError as exc:
        return _read_refused(exc, approver)
    token = request.app[CSRF_KEY].issue(approver)
    jaeger = request.app[APPROVER_KEY]["jaeger_url"]
    return _html(pages.pending_page(escalations, approver=approver, jaeger_url=jaeger, csrf_token=token,
                                    banner=banner), status=status)


def _sidecar_problem(exc: ApprovalsError) -> str:
    if exc.unreachable:  # nothing answered: say so, not "answered"
        return f"The sidecar could not be reached (console.sidecar, --sidecar): {exc.message}"
    return f"The sidecar answered: {exc.message}"


def _read_refused(exc: ApprovalsError, approver: str) -> web.Response:
    """The page for a List or Get the sidecar refused (this person may not read it: 403; no such
    escalation: 404) or could not answer (502)."""
    title, status = {"PERMISSION_DENIED": ("Not an approver", 403),
                     "NOT_FOUND": ("Not found", 404)}.get(exc.status, ("Sidecar unavailable", 502))
    return _html(pages.error_page(title, _sidecar_problem(exc), approver=approver), status=status)


# The banner after a decision, by the query key the redirect sets: the states that key may announce.
DECIDED_STATES = {"approved": ("approved", "used"), "denied": ("denied",)}


async def _decided_banner(request: web.Request, approver: str) -> tuple[str, str] | None:
    """The banner for `/?approved=<id>` or `/?denied=<id>`, only when this approver did decide it so.

    The query is a link anyone can send, so it is checked against the sidecar: a pending escalation,
    another outcome or another approver's decision shows no banner."""
    for verb, states in DECIDED_STATES.items():
        eid = request.query.get(verb, "")
        if not (eid.startswith("esc-") and len(eid) <= 64 and eid.isprintable()):
            continue
        try:
            escalation = await request.app[CLIENT_KEY].get(eid, approver=approver)
        except ApprovalsError:
            continue
        if escalation["state"] in states and escalation["approver"] == approver:
            return ("ok", f"{verb.capitalize()} {eid}." + (" The agent may now repeat the call once."
                                                         if verb == "approved" else ""))
    return None


async def pending_view(request: web.Request) -> web.Response:
    approver = approver_of(request)
    return await _render_pending(request, approver, await _decided_banner(request, approver))


async def history_view(request: web.Request) -> web.Response:
    approver = approver_of(request)
    client = request.app[CLIENT_KEY]
    limit = request.app[APPROVER_KEY]["history_limit"]
    try:
        batches = await asyncio.gather(*(client.list(state=s, limit=limit, approver=approver)
                                         for s in HISTORY_STATES))
    except ApprovalsError as exc:
        return _read_refused(exc, approver)
    rows = [e for batch in batches for e in batch]
    rows.sort(key=lambda e: e["decided_at"] or e["expires_at"], reverse=True)
    jaeger = request.app[APPROVER_KEY]["jaeger_url"]
    return _html(pages.history_page(rows[:limit], approver=approver, jaeger_url=jaeger))


async def detail_view(request: web.Request) -> web.Response:
    approver = approver_of(request)
    try:
        escalation = await request.app[CLIENT_KEY].get(request.match_info["id"], approver=approver)
    except ApprovalsError as exc:
        return _read_refused(exc, approver)
    token = request.app[CSRF_KEY].issue(approver)
    jaeger = request.app[APPROVER_KEY]["jaeger_url"]
    return _html(pages.detail_page(escalation, approver=approver, jaeger_url=jaeger, csrf_token=token))


def _same_origin(request: web.Request) -> str | None:
    """Why a POST looks cross-site, or None. Browsers send Origin on POST; Sec-Fetch-Site when they can."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return f"the form was sent from another site (Sec-Fetch-Site: {request.headers['Sec-Fetch-Site']})"
    origin = request.headers.get("Origin")
    if origin and origin != "null":
        expected = {f"{scheme}://{request.host}" for scheme in ("http", "https")}
        forwarded_host = request.headers.get("X-Forwarded-Host")
        if forwarded_host:
            expected |= {f"{scheme}://{forwarded_host}" for scheme in ("http", "https")}
        if origin not in expected:
            return f"the form was sent from another origin ({origin})"
    return None


DECIDE_FIELDS = ("decision", "note", "csrf_token")


class FormError(Exception):
    pass


async def _decide_form(request: web.Request) -> dict[str, str]:
    """The decision form's fields as text; raises FormError when it cannot be read one way: a body
    that does not parse, a field sent as a file, or a field given twice (which one would count?)."""
    try:
        form = await request.post()
    except ValueError as exc:  # e.g. multipart without a boundary
        raise FormError(f"the form could not be read ({exc})") from None
    fields: dict[str, str] = {}
    for name in DECIDE_FIELDS:
        values = form.getall(name, [])
        if len(values) > 1:
            raise FormError(f"the form gives {name} {len(values)} times")
        if values and not isinstance(values[0], str):
            raise FormError(f"the form sends {name} as a file, not text")
        fields[name] = values[0] if values else ""
    return fields


async def decide_view(request: web.Request) -> web.Response:
    approver = approver_of(request)
    escalation_id = request.match_info["id"]
    decision: str | None = None
    status = 403
    problem = _same_origin(request)
    if problem is None:
        try:
            form = await _decide_form(request)
            decision = form["decision"]
            request.app[CSRF_KEY].check(form["csrf_token"] or None, approver)
        except FormError as exc:
            problem, status = str(exc), 400
        except CsrfError as exc:
            problem = str(exc)
    if problem is not None:
        log.warning(
            "console: refused %s of %s by %s from %s: %s: %s; nothing was sent to the sidecar",
            visible(decision), visible(escalation_id), visible(approver), request.remote,
            "form" if status == 400 else "csrf", visible(problem),
        )
        return await _render_pending(request, approver, ("error", f"Refused: {problem}. Nothing was changed."), status)
    note = form["note"].replace("\r\n", "\n")
    if decision not in ("approve", "deny"):
        return await _render_pending(request, approver, ("error", "Refused: choose Approve or Deny."), 400)
    client = request.app[CLIENT_KEY]
    method = client.approve if decision == "approve" else client.deny
    try:
        await method(escalation_id, note=note, approver=approver)
    except ApprovalsError as exc:
        log.info("console: %s of %s by %s refused: %s", decision, visible(escalation_id), visible(approver),
                 visible(exc.message))
        status = 502 if exc.unreachable else 409
        return await _render_pending(request, approver, ("error", f"Refused: {exc.message}"), status)
    log.info("console: %s %s by %s", "approved" if decision == "approve" else "denied", visible(escalation_id),
             visible(approver))
    verb = "approved" if decision == "approve" else "denied"
    raise web.HTTPSeeOther(f"/?{verb}={escalation_id}")


async def css_view(request: web.Request) -> web.Response:
    return web.Response(text=pages.CSS, content_type="text/css", charset="utf-8")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def build_app(
    client: ApprovalsClient,
    *,
    trusted_header: str = "",
    approver_prefix: str = "email:",
    dev_approver: str = "",
    jaeger_url: str = "",
    csrf: CsrfTokens,
    history_limit: int = 100,
) -> web.Application:
    if not trusted_header and not dev_approver:
        raise ConsoleError(
            "console: set console.trusted_header (the header your auth proxy sets, e.g. X-Auth-Request-Email) "
            "or, for development only, console.dev_approver"
        )
    app = web.Application(middlewares=[security], client_max_size=64 * 1024)
    app[APPROVER_KEY] = {
        "trusted_header": trusted_header,
        "prefix": approver_prefix,
        "dev_approver": dev_approver,
        "jaeger_url": jaeger_url,
        "history_limit": history_limit,
    }
    app[CLIENT_KEY] = client
    app[CSRF_KEY] = csrf
    app.router.add_get("/", pending_view)
    app.router.add_get("/history", history_view)
    app.router.add_get("/escalations/{id}", detail_view)
    app.router.add_post("/escalations/{id}/decide", decide_view)
    app.router.add_get("/static/console.css", css_view)
    app.router.add_get("/healthz", healthz)
    return app


def app_from_config(config: Any) -> web.Application:
    config.validate_console()  # outside dev mode: trusted header and the console's own JWT-SVID (ConfigError)
    console = config.console
    metadata = token_file_metadata(console.token_file) if console.token_file else None
    try:
        secret = load_secret(console.csrf_secret_file)
    except (CsrfError, OSError) as exc:
        raise ConsoleError(f"console.csrf_secret_file: {exc}") from None
    client = ApprovalsClient(sidecar_address(config), metadata=metadata)
    app = build_app(
        client,
        trusted_header=console.trusted_header,
        approver_prefix=console.approver_prefix,
        dev_approver=console.dev_approver,
        jaeger_url=console.jaeger_url,
        csrf=CsrfTokens(secret),
        history_limit=console.history_limit,
    )

    async def close_client(app: web.Application) -> None:
        await client.aclose()

    app.on_cleanup.append(close_client)
    return app


async def start_console(config: Any, listen: str | None = None) -> tuple[web.AppRunner, int]:
    """Serve the console; returns the runner (await runner.cleanup() to stop) and the bound port.

    The port is bound the way the sidecar binds its own (sidecar/sockets.py), so a port in use is a
    ConfigError naming console.listen (exit 2), not a traceback."""
    app = app_from_config(config)
    sock = tcp_listener("console.listen", listen or config.console.listen)
    runner = web.AppRunner(app, access_log=log)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    return runner, sock.getsockname()[1]


async def run_console(config: Any) -> None:
    runner, port = await start_console(config)
    host = config.console.listen.rpartition(":")[0]
    mode = (f"approver from the {config.console.trusted_header} header"
            if config.console.trusted_header else f"DEV MODE: everyone is {config.console.dev_approver}")
    print(f"agent-sidecar console serving on http://{host}:{port}/", flush=True)
    print(f"  sidecar       {sidecar_address(config)}", flush=True)
    print(f"  identity      {mode}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
