"""The MCP gateway: MCP over Streamable HTTP at http://<mcp.listen>/mcp, in front of upstream MCP servers.

    gateway = McpGateway(gate=..., identity=..., executor=..., invoker=McpInvoker(...),
                         tcp=tcp_listener("mcp.listen", "127.0.0.1:8765"),   # bound sockets (sidecar/sockets.py)
                         tls=SvidSslContexts(source))   # tls: optional, HTTPS with mutual TLS on `tcp`
    await gateway.start()        # returns once it serves; gateway.url is http(s)://host:port/mcp
    await gateway.aclose()
    async with gateway: ...      # the same; a start that fails part way stops what it had started

The listeners are bound by the caller (server.py, through sidecar/listeners.py) before the
sidecar starts anything, so a port in use refuses the start before it writes evidence.

- tools/list: every upstream's tools as `U__T` (sidecar.mcp.names), only those
  policy does not deny in the list phase (`input.request.phase: "list"`);
  descriptions and schemas pass through.
- tools/call: the same Gate as Authorize (`tool.name = T`, `tool.server = U`).
  allow → obligations applied, the call made by the invoker, its result
  returned (and an `invocation` record written); deny → a tool error result
  with the reasons; escalate → a tool error result with the escalation id.
  The same call repeated after the approval carries the approval (once).
  A client with the `elicitation` capability is first asked whether to wait
  for the approver (sidecar.mcp.elicitation); on accept the gateway waits up
  to `elicitation_wait_seconds` and answers the approved call in the same
  tools/call. The answer is never an approval.
- resources/*, prompts/*: not served (the gateway declares only `tools`),
  so the SDK answers "method not found"; nothing reaches an upstream unchecked.
- Identity: the configured resolvers over the HTTP request (JWT-SVID in
  `authorization: Bearer`, `x-spiffe-delegation`, the pod identity on `unix`,
  dev) and, with `tls` (sidecar.mcp.tls), the client certificate the TCP
  listener's mutual TLS verified (`mtls`). The caller's own `authorization`
  header is never forwarded upstream.
- A body that is not JSON-RPC is recorded as a denied call, then answered by the SDK (judged
  with the parser and model of the route the SDK takes for it); so is a `tools/call` the SDK
  refuses before the gateway's handler: params that do not validate (an SDK middleware), or
  any HTTP error status (session, protocol headers, envelope), recorded before it is sent.

`_meta` keys a client may send with tools/call: `sidecar/task_id`,
`sidecar/intent`, `sidecar/signals`, `sidecar/call_id`, `sidecar/escalation_id`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import replace
from typing import Any, Protocol

import mcp_types as types
import pydantic_core
import uvicorn
from mcp.server.caching import CacheHint
from mcp.server.context import CallNext, ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request

from sidecar.calls import ToolCall
from sidecar.canonical import NotCanonicalizable, canonical_json, sha256_digest
from sidecar.escalation import EscalationRefused, StoreError
from sidecar.evidence import TraceContext
from sidecar.evidence.records import reason_code
from sidecar.gate import Gate, Verdict
from sidecar.identity import CallerIdentity, IdentityError, IdentityResolver, PeerInfo, resolve_caller
from sidecar.invoke import FAILED, NOT_CALLED
from sidecar.invoke.executor import Executor
from sidecar.invoke.mcp import McpInvoker
from sidecar.jsonvalues import normalize
from sidecar.mcp import elicitation, names
from sidecar.mcp.tls import SvidSslContexts, TlsH11Protocol, peer_auth_context
from sidecar.reasons import (
    ESCALATION_PENDING,
    INVALID_ARGUMENTS,
    MALFORMED_REQUEST,
    UNKNOWN_TOOL,
    UNVERIFIED_CALLER,
    UPSTREAM_UNAVAILABLE,
    Reason,
)

log = logging.getLogger(__name__)
META_PREFIX = "sidecar/"
TEXT_META = ("task_id", "intent", "call_id", "escalation_id")
# Set by `_record_refused_calls` around one tools/call; the handler marks it once the call is its own.
_HANDLER_REACHED: ContextVar[list[bool] | None] = ContextVar("sidecar_mcp_handler_reached", default=None)


def peer_from_scope(scope: dict) -> PeerInfo:
    """PeerInfo of an HTTP request: the listener it came in on (tcp | tls | unix), header names
    lowercased, repeats joined with ", " as gRPC metadata is (a second authorization header is then
    refused by the resolver, not silently dropped), and on `tls` the verified client certificate."""
    metadata: dict[str, str] = {}
    for key, value in Headers(scope=scope).items():  # every header line, repeats included
        key = key.lower()
        metadata[key] = f"{metadata[key]}, {value}" if key in metadata else value
    transport = scope.get(_TRANSPORT_KEY, "tcp")
    auth_context = peer_auth_context(scope) if transport == "tls" else {}
    return PeerInfo(transport=transport, metadata=metadata, auth_context=auth_context)


class CallerResolver(Protocol):
    """Who is calling, from the request's PeerInfo; never raises: an unverifiable caller is an IdentityError
    value (McpGateway.resolve)."""

    def __call__(self, peer: PeerInfo, /) -> CallerIdentity | IdentityError: ...


def _text_result(text: str, meta: dict[str, Any]) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True, _meta=meta)


class McpGateway:
    def __init__(
        self,
        *,
        gate: Gate,
        identity: IdentityResolver,
        executor: Executor,
        invoker: McpInvoker,
        max_body_bytes: int,
        tcp: socket.socket | None = None,
        unix: socket.socket | None = None,
        escalation_memory: int = 10_000,
        grpc_address: str = "",
        list_ttl_ms: int = 0,
        escalations: elicitation.Escalations | None = None,
        elicitation_wait_seconds: float = 0.0,
        tls: SvidSslContexts | None = None,
    ):
        self._gate = gate
        self._identity = identity
        self._executor = executor
        self._invoker = invoker
        self._tcp = tcp  # the listening TCP socket serving /mcp (mcp.listen; None = none)
        self._unix = unix  # the listening in-pod unix socket also serving /mcp (mcp.unix; None = none)
        self._tls = tls  # the TCP listener serves HTTPS with mutual TLS (None = plain HTTP)
        self._max_body = max_body_bytes
        self._pending: OrderedDict[tuple, str] = OrderedDict()  # call shape → escalation id
        self._memory = escalation_memory
        self._grpc_address = grpc_address  # named in escalation answers: where AwaitDecision is served
        # MCP elicitation of escalated calls (sidecar.mcp.elicitation): None or 0 s = never asked.
        self._escalations = escalations
        self._wait_seconds = elicitation_wait_seconds
        self._refused: set[tuple[str, str]] = set()
        self._input_schemas: dict[str, dict[str, Any]] = {}  # exposed name → input schema, from the last listing
        self._server = Server(
            "agent-sidecar",
            instructions="Tools behind agent-sidecar: every call is decided by policy and recorded.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            # The SDK checks a call's Mcp-Param-* headers against the tool's input schema; without
            # this lookup it would run the whole tools/list handler (upstreams, policy) per call.
            get_tool_input_schema=self._input_schemas.get,
            # A client may reuse its caller's own tools/list this long (never shared across callers).
            cache_hints={"tools/list": CacheHint(ttl_ms=list_ttl_ms, scope="private")},
        )
        self._server.middleware.append(self._record_refused_calls)
        self._servers: list[tuple[uvicorn.Server, asyncio.Task]] = []
        self.url = ""

    # ------------------------------------------------------------ serving

    async def __aenter__(self) -> "McpGateway":
        try:
            await self.start()
        except BaseException:
            await self.aclose()  # a listener bound before the failure
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> str:
        """Connect the upstreams (in the background) and serve on the listeners; returns the TCP /mcp URL ("" without one)."""
        self._invoker.start()
        host = self._tcp.getsockname()[0] if self._tcp is not None else "127.0.0.1"
        security = None
        if host in ("127.0.0.1", "::1"):
            # The SDK's DNS-rebinding protection for loopback, also accepting a Host without a port
            # (http://localhost/mcp, what clients of the unix socket send).
            hosts = ["127.0.0.1", "localhost", "[::1]"]
            schemes = ("http", "https") if self._tls is not None else ("http",)
            security = TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=[*hosts, *(f"{h}:*" for h in hosts)],
                allowed_origins=[f"{scheme}://{h}{port}" for scheme in schemes for h in hosts for port in ("", ":*")],
            )
        app = self._server.streamable_http_app(
            host=host, max_request_body_size=self._max_body, json_response=False, transport_security=security
        )
        recording = _RecordMalformed(app, gate=self._gate, resolve=self.resolve, max_body_bytes=self._max_body)
        if self._tcp is not None:
            self.url = _url(self._tcp, "https" if self._tls is not None else "http")
            if self._tls is not None:
                served = await _serve(_Transport(recording, "tls"), self._tcp, lifespan="on", tls=self._tls)
            else:
                served = await _serve(_Transport(recording, "tcp"), self._tcp, lifespan="on")
            self._servers.append(served)
        if self._unix is not None:
            # The session manager runs in the TCP server's lifespan; this one needs its own without TCP.
            lifespan = "off" if self._servers else "on"
            self._servers.append(await _serve(_Transport(recording, "unix"), self._unix, lifespan=lifespan))
        return self.url

    async def aclose(self) -> None:
        for server, task in reversed(self._servers):
            server.should_exit = True
            try:
                await asyncio.wait_for(task, 10)
            except asyncio.TimeoutError:
                server.force_exit = True
                task.cancel()
        self._servers.clear()
        await self._invoker.aclose()

    # ----------------------------------------------------------- identity

    def resolve(self, peer: PeerInfo) -> CallerIdentity | IdentityError:
        return resolve_caller(self._identity, peer)

    def _peer(self, ctx: Any) -> PeerInfo:
        request = ctx.request
        if isinstance(request, Request):
            return peer_from_scope(request.scope)
        return PeerInfo(transport="tcp")

    # ------------------------------------------------------------ handlers

    async def _list_tools(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        identity = self.resolve(self._peer(ctx))
        if isinstance(identity, IdentityError):
            raise MCPError(types.INVALID_REQUEST, str(Reason(UNVERIFIED_CALLER, identity.reason)))
        upstream_names = list(self._invoker.upstreams)
        offered = []
        for upstream, tool in await self._invoker.tools():
            problem = names.refusal(upstream, tool.name, upstream_names)
            if problem:
                if (upstream, tool.name) not in self._refused:  # once per tool, not per listing
                    self._refused.add((upstream, tool.name))
                    log.warning("MCP gateway: %s", problem)
                continue
            offered.append((upstream, tool))
            self._input_schemas[names.exposed_name(upstream, tool.name)] = tool.input_schema
        decisions = await asyncio.gather(*(self._gate.visible(identity, t.name, u) for u, t in offered))
        tools = [
            tool.model_copy(update={"name": names.exposed_name(upstream, tool.name)})
            for (upstream, tool), decision in zip(offered, decisions)
            if decision.outcome != "deny"
        ]
        return types.ListToolsResult(tools=tools)

    async def _record_refused_calls(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> Any:
        """SDK middleware: a tools/call refused before `_call_tool` runs (its params do not validate
        as the SDK's CallToolRequestParams) is recorded as a denied call; the SDK answers the error."""
        if ctx.method != "tools/call":
            return await call_next(ctx)
        reached: list[bool] = []
        token = _HANDLER_REACHED.set(reached)
        _mark_decided(ctx)  # recorded by the handler, or below
        try:
            return await call_next(ctx)
        except Exception as exc:
            if not reached:
                problem = str(Reason(MALFORMED_REQUEST, f"the MCP tools/call was refused: {_refusal_text(exc)}"))
                peer = self._peer(ctx)
                await self._gate.authorize(ToolCall(tool="", arguments={}), self.resolve(peer), None, malformed=problem)
            raise
        finally:
            _HANDLER_REACHED.reset(token)

    async def _call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult | types.InputRequiredResult:
        reached = _HANDLER_REACHED.get()
        if reached is not None:
            reached.append(True)  # from here on the call is decided and recorded by the Gate
        _mark_decided(ctx)
        peer = self._peer(ctx)
        identity = self.resolve(peer)
        meta = dict(params.meta or {})
        parent = TraceContext.from_traceparent(peer.metadata.get("traceparent")) or TraceContext.from_traceparent(
            meta.get("traceparent") if isinstance(meta.get("traceparent"), str) else None
        )
        arguments = params.arguments if params.arguments is not None else {}
        fields: dict[str, Any] = {}
        problem = ""
        for key in TEXT_META:
            value = meta.get(META_PREFIX + key, "")
            if not isinstance(value, str):
                problem = str(Reason(MALFORMED_REQUEST, f"_meta {META_PREFIX}{key} must be a string"))
                value = ""
            fields[key] = value
        signals = meta.get(META_PREFIX + "signals")
        split = names.split_name(params.name)
        upstream, tool = split if split else ("", params.name)
        if not problem:
            if split is None or upstream not in self._invoker.upstreams:
                problem = str(Reason(
                    UNKNOWN_TOOL,
                    f"no tool {params.name!r} behind this gateway (names are <upstream>{names.SEPARATOR}<tool>)",
                ))
            else:
                refused = names.refusal(upstream, tool, self._invoker.upstreams)
                if refused:
                    problem = str(Reason(UNKNOWN_TOOL, refused))
                elif isinstance(arguments, dict):  # anything else is the Gate's invalid_arguments
                    arguments, problem = await self._as_the_tool_reads(upstream, tool, arguments)
        call = ToolCall(
            tool=tool,
            server=upstream,
            arguments=arguments,
            call_id=fields["call_id"],
            task_id=fields["task_id"],
            intent=fields["intent"],
            signals=signals,
            escalation_id=fields["escalation_id"],
        )
        shape = self._shape(identity, call)
        remembered = False
        if not problem and not call.escalation_id and shape is not None and shape in self._pending:
            call = replace(call, escalation_id=self._pending[shape])
            remembered = True
        verdict = await self._decide(call, identity, parent, problem, shape, remembered)
        if verdict.decision.outcome == "escalate" and verdict.escalation_id and self._escalations is not None:
            started = asyncio.get_running_loop().time()
            # On 2026-07-28 the user's answer comes with the repeated call; else ask now.
            answer = elicitation.reply(params) if elicitation.supports_form(ctx.session.client_capabilities) else None
            if answer is None:
                asked = await self._ask(ctx, call, verdict, params.name)
                if isinstance(asked, types.InputRequiredResult):
                    return asked  # 2026-07-28: the client asks its user and repeats the call with the answer
                answer = asked
            if answer == elicitation.ACCEPT and self._wait_seconds > 0:
                # Wait on the escalation the Gate named for this very call (never one the client names),
                # then the call goes through the Gate again as its repeated call: only an approver's
                # decision lets it run.
                call = replace(call, escalation_id=verdict.escalation_id)
                left = self._wait_seconds - (asyncio.get_running_loop().time() - started)  # question and wait together
                if await elicitation.wait_for_decision(self._escalations, call.escalation_id, left) is None:
                    return self._still_pending(call, verdict)
                # The repeat is a new decision: its caller is verified again, as it stands after the wait
                # (a JWT-SVID or client certificate may have expired meanwhile), never taken from before it.
                identity = self.resolve(self._peer(ctx))
                verdict = await self._decide(call, identity, parent, "", shape, True)
        return await self._answer(call, identity, verdict)

    async def _as_the_tool_reads(self, upstream: str, tool: str,
                                 arguments: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The arguments as the upstream tool will read them (its schema's defaults filled in), and why
        the tool would not read them as decided or "" (sidecar/invoke/schemas.py). Judged on the arguments
        as the Gate decides on them (the numbers rule: 1.0 is 1)."""
        try:
            schema = await self._invoker.input_schema(upstream, tool)
        except Exception as exc:  # the upstream cannot list its tools: nothing to judge the call by
            detail = (str(exc) or type(exc).__name__)[:300]
            return arguments, str(Reason(UPSTREAM_UNAVAILABLE, f"the input schema of {tool} could not be read "
                                                               f"from upstream {upstream}, so the call is not "
                                                               f"decided ({detail})"))
        if schema is None:
            return arguments, str(Reason(UNKNOWN_TOOL, f"upstream {upstream} lists no tool {tool!r}"))
        filled, refused = schema.read(normalize(arguments))
        return filled, str(Reason(INVALID_ARGUMENTS, refused)) if refused else ""

    async def _decide(self, call: ToolCall, identity: CallerIdentity | IdentityError, parent: TraceContext | None,
                      problem: str, shape: tuple | None, remembered: bool) -> Verdict:
        verdict = await self._gate.authorize(call, identity, parent, malformed=problem or None)
        if shape is not None and (remembered or verdict.decision.outcome == "escalate"):
            self._remember(shape, verdict, remembered)
        return verdict

    @staticmethod
    def _meta(call: ToolCall, verdict: Verdict) -> dict[str, Any]:
        meta = {"sidecar/decision_id": verdict.decision_id, "sidecar/trace_id": verdict.trace.trace_id,
                "sidecar/outcome": verdict.decision.outcome}
        escalation_id = verdict.escalation_id or call.escalation_id
        if escalation_id:
            meta["sidecar/escalation_id"] = escalation_id
        return meta

    async def _answer(self, call: ToolCall, identity: CallerIdentity | IdentityError,
                      verdict: Verdict) -> types.CallToolResult:
        """The answer to a decided call: the tool's result after an allow (the call made here), else a tool error."""
        outcome = verdict.decision.outcome
        base_meta = self._meta(call, verdict)
        if outcome == "deny":
            reasons = "; ".join(verdict.decision.reasons)
            return _text_result(f"denied by policy (decision {verdict.decision_id}): {reasons}", base_meta)
        if outcome == "escalate":
            return _text_result(self._escalation_text(verdict), base_meta)
        assert isinstance(identity, CallerIdentity)
        performed = await self._executor.perform(call, identity, verdict, self._invoker)
        result = performed.result
        if performed.record_error:
            return _text_result(performed.record_error, base_meta)
        if result.status in (FAILED, NOT_CALLED):
            return _text_result(f"allowed (decision {verdict.decision_id}) but the call failed: {result.error}", base_meta)
        answer = types.CallToolResult.model_validate(result.result)
        # `sidecar/*` keys are the gateway's word (decision, outcome, escalation): an upstream's own are dropped
        upstream_meta = {k: v for k, v in (answer.meta or {}).items() if not k.startswith(META_PREFIX)}
        return answer.model_copy(update={"meta": {**upstream_meta, **base_meta}})

    # ------------------------------------------------------- escalations

    @staticmethod
    def _shape(identity: CallerIdentity | IdentityError, call: ToolCall) -> tuple | None:
        if not isinstance(identity, CallerIdentity) or not isinstance(call.arguments, dict):
            return None
        try:
            digest = sha256_digest(canonical_json(call.arguments))
        except NotCanonicalizable:
            return None
        delegation = tuple(link.spiffe_id for link in identity.delegation)
        return (identity.subject.spiffe_id, delegation, call.server, call.tool, digest, call.task_id)

    def _remember(self, shape: tuple, verdict: Verdict, remembered: bool) -> None:
        """Keep the escalation id of an escalated call, so the same call after the approval carries it."""
        if verdict.decision.outcome == "escalate":
            self._pending[shape] = verdict.escalation_id
            self._pending.move_to_end(shape)
            while len(self._pending) > self._memory:
                self._pending.popitem(last=False)
            return
        still_waiting = any(reason_code(r) == ESCALATION_PENDING for r in verdict.decision.reasons)
        if remembered and not still_waiting:
            self._pending.pop(shape, None)  # used, denied or expired: the next call asks policy afresh

    async def _ask(self, ctx: ServerRequestContext[Any, Any], call: ToolCall, verdict: Verdict,
                   exposed_name: str) -> types.InputRequiredResult | str:
        """Ask a client with the elicitation capability whether to wait (sidecar.mcp.elicitation): the question
        to return (2026-07-28), or the answer to the question sent now (handshake revisions; NOT_ASKED: not asked)."""
        if self._escalations is None or self._wait_seconds <= 0 or not verdict.escalation_id:
            return elicitation.NOT_ASKED
        session = ctx.session
        if not elicitation.supports_form(session.client_capabilities):
            return elicitation.NOT_ASKED
        in_band = elicitation.in_band(session.protocol_version)
        if not in_band and not session.can_send_request:
            return elicitation.NOT_ASKED
        try:
            record = await self._escalations.get(verdict.escalation_id)
        except (EscalationRefused, StoreError) as exc:
            log.warning("escalation %s: not asking the client to wait: %s", verdict.escalation_id, exc)
            return elicitation.NOT_ASKED
        message = elicitation.question(record, exposed_name, self._wait_seconds)
        if in_band:
            asked = elicitation.input_required(message)
            return asked.model_copy(update={"meta": self._meta(call, verdict)})
        return await elicitation.ask(session, ctx.request_id, message, self._wait_seconds)

    def _still_pending(self, call: ToolCall, verdict: Verdict) -> types.CallToolResult:
        return _text_result(
            f"still pending after waiting {self._wait_seconds:g} s: the call was not made. " + self._escalation_text(verdict),
            self._meta(call, verdict),
        )

    def _escalation_text(self, verdict: Verdict) -> str:
        reasons = "; ".join(verdict.decision.reasons)
        where = f" at {self._grpc_address}" if self._grpc_address else ""
        return (
            f"needs approval: escalation {verdict.escalation_id} (decision {verdict.decision_id}) waits for a "
            f"human approver. Reasons: {reasons}. To wait, call AwaitDecision(escalation_id={verdict.escalation_id!r}) "
            f"on the sidecar's gRPC API{where} or watch `agent-sidecar approvals list`. Once it is approved, call this "
            "tool again with the same arguments: the approval is used once."
        )


_TRANSPORT_KEY = "sidecar.transport"
_DECIDED_KEY = "sidecar.tools_call_decided"  # set on a request's scope once the gateway has its tools/call


class _Transport:
    """ASGI wrapper: marks each request with the listener it came in on (tcp | tls | unix) for the identity resolvers."""

    def __init__(self, app: Any, transport: str):
        self._app = app
        self._transport = transport

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            scope[_TRANSPORT_KEY] = self._transport
        await self._app(scope, receive, send)


def _url(sock: socket.socket, scheme: str) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
    return f"{scheme}://{shown}:{port}/mcp"


async def _serve(
    app: Any, sock: socket.socket, *, lifespan: str, tls: SvidSslContexts | None = None
) -> tuple[uvicorn.Server, asyncio.Task]:
    options: dict[str, Any] = {}
    if tls is not None:  # HTTPS: the SVID-following context, and the protocol that exposes the client chain
        options = {"http": TlsH11Protocol, "ssl_context_factory": lambda _config, _default: tls.listening_context()}
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan, access_log=False, **options))
    task = asyncio.create_task(server.serve(sockets=[sock]), name="mcp-gateway")
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the MCP gateway stopped while starting")
        await asyncio.sleep(0.01)
    return server, task


class _RecordMalformed:
    """ASGI wrapper: a POST body that is not JSON-RPC is recorded as a denied call before the SDK answers it."""

    def __init__(self, app: Any, *, gate: Gate, resolve: CallerResolver, max_body_bytes: int):
        self._app = app
        self._gate = gate
        self._resolve = resolve
        self._max_body = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self._app(scope, receive, send)
            return
        # Read no further than the limit: past it the SDK answers 413 without reading the rest,
        # and nothing here may hold more of a body than the SDK would (memory is the limit's point).
        messages = []
        size = _declared_length(scope)
        declared = size is not None and size > self._max_body
        if not declared:
            size = 0
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    break
                size += len(message.get("body", b""))
                if size > self._max_body or not message.get("more_body"):
                    break
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        problem = self._problem(body, size or 0, declared, modern=_modern_route(scope))
        peer = peer_from_scope(scope)
        if problem:
            await self._gate.authorize(ToolCall(tool="", arguments={}), self._resolve(peer), None, malformed=problem)
        # A tools/call the SDK refuses before any handler runs (its session or protocol headers, the
        # per-request envelope) is answered with an HTTP error status: recorded first, unless the
        # gateway already decided it (`_mark_decided`) or it was recorded above.
        scope[_DECIDED_KEY] = bool(problem)

        async def sending(message: dict) -> None:
            if (message["type"] == "http.response.start" and message.get("status", 200) >= 400
                    and not scope.get(_DECIDED_KEY) and _is_tools_call(body)):
                scope[_DECIDED_KEY] = True
                refused = str(Reason(MALFORMED_REQUEST, f"the MCP tools/call was refused before it could be "
                                                        f"decided (HTTP {message.get('status')})"))
                await self._gate.authorize(ToolCall(tool="", arguments={}), self._resolve(peer), None, malformed=refused)
            await send(message)

        async def replay() -> dict:
            if messages:
                return messages.pop(0)
            return await receive()

        await self._app(scope, replay, sending)

    def _problem(self, body: bytes, size: int, declared: bool = False, *, modern: bool = False) -> str:
        """Why the SDK will refuse this body, judged as the SDK judges it on the route it takes, or "".

        The handshake route (the SDK's StreamableHTTPServerTransport) reads with pydantic's JSON parser
        and its JSON-RPC message model; the per-request-envelope route (an MCP-Protocol-Version header
        past the handshake versions) with Python's json module and its request model. The two read
        different text (a lone surrogate escape), so each is judged as its route reads it."""
        if size > self._max_body:
            return str(Reason(
                MALFORMED_REQUEST, f"the MCP message is {size} bytes{'' if declared else ' or more'}, "
                f"over the {self._max_body}-byte limit"
            ))
        try:
            message = json.loads(body) if modern else pydantic_core.from_json(body)
        except (ValueError, RecursionError) as exc:
            return str(Reason(MALFORMED_REQUEST, f"the MCP message is not JSON ({str(exc)[:200]})"))
        if modern:
            if isinstance(message, dict) and "id" not in message:  # the SDK acknowledges it as a notification
                notification = True
            else:
                try:
                    types.JSONRPCRequest.model_validate(message)
                except ValidationError:
                    return str(Reason(MALFORMED_REQUEST, "the MCP message is not a JSON-RPC 2.0 object"))
                notification = False
            method = message.get("method") if isinstance(message, dict) else None
        else:
            try:
                parsed = types.jsonrpc_message_adapter.validate_python(message, by_name=False)
            except ValidationError:
                return str(Reason(MALFORMED_REQUEST, "the MCP message is not a JSON-RPC 2.0 object"))
            notification = isinstance(parsed, types.JSONRPCNotification)
            method = getattr(parsed, "method", None)
        if notification and method == "tools/call":
            # e.g. an id that is not a string or number: taken for a notification and dropped
            return str(Reason(MALFORMED_REQUEST, "the MCP tools/call has no valid id, so it is never answered"))
        return ""


def _modern_route(scope: dict) -> bool:
    """Whether the SDK serves this request on its per-request-envelope route (as its session manager
    picks it: the first MCP-Protocol-Version header, when it names no handshake version)."""
    version = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"mcp-protocol-version"), None)
    return version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS


def _is_tools_call(body: bytes) -> bool:
    """Whether the body (read leniently) asks for a tools/call, alone or in a batch."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return False
    batch = message if isinstance(message, list) else [message]
    return any(isinstance(m, dict) and m.get("method") == "tools/call" for m in batch)


def _mark_decided(ctx: ServerRequestContext[Any, Any]) -> None:
    """Tell the HTTP request that carried this tools/call that the gateway has it (recorded either way);
    a call over stdio has no HTTP request (`ctx.request` None)."""
    if isinstance(ctx.request, Request):
        ctx.request.scope[_DECIDED_KEY] = True


def _declared_length(scope: dict) -> int | None:
    """The request's Content-Length, when it declares one the SDK would read as a number."""
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _refusal_text(exc: BaseException) -> str:
    """Where and why the SDK refused a call, without the values (they go to evidence only as the Gate records them)."""
    if isinstance(exc, ValidationError):
        where = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'params'}: {error['msg']}" for error in exc.errors()[:3]
        )
        return f"its params do not validate ({where[:300]})"
    if isinstance(exc, MCPError):
        return f"{exc.message[:200]} (JSON-RPC error {exc.code})"
    return type(exc).__name__
