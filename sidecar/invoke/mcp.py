"""The MCP invoker: one long-lived client session per upstream MCP server.

    upstream = McpUpstream("docs", url="http://docs:8000/mcp", credential=..., timeout_seconds=10)
    upstream = McpUpstream("fs", command=["python", "fs_server.py"])      # stdio
    invoker = McpInvoker([upstream, ...]); await invoker.start()
    await invoker.tools()                -> [(upstream name, mcp_types.Tool)]
    await invoker.input_schema(upstream, tool) -> the tool's InputSchema, None when not listed
    await invoker.invoke(call, verdict)  -> InvocationResult  (call.server names the upstream)
    await invoker.aclose()

Each upstream's session runs in its own task (the SDK's anyio task groups
must be entered and left in one task) and reconnects with capped backoff
when it breaks; a call meanwhile waits for the new session (at most the
upstream's timeout), then fails with upstream_unavailable. Every call
has the upstream's timeout; a result larger than `max_result_bytes` (its
canonical JSON) is refused with upstream_too_large. The rollback token is
the result's `_meta.rollback_token` (a string), when the tool gives one.
Each upstream keeps its tools' input schemas from its last listing (the gateway
checks a call against them before policy, sidecar/invoke/schemas.py); they are
forgotten when the session is replaced or the upstream says its tools changed
(`notifications/tools/list_changed`), and a tool not among them lists afresh.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Sequence

import httpx2
import mcp_types as types
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from sidecar.canonical import NotCanonicalizable, canonical_json
from sidecar.invoke import FAILED, NOT_CALLED, OK, TOOL_ERROR, CredentialUse, InvocationResult
from sidecar.invoke.credentials import CredentialError, CredentialProvider
from sidecar.invoke.schemas import InputSchema
from sidecar.reasons import (
    UNKNOWN_TOOL,
    UPSTREAM_ERROR,
    UPSTREAM_MALFORMED,
    UPSTREAM_TIMEOUT,
    UPSTREAM_TOO_LARGE,
    UPSTREAM_UNAVAILABLE,
    Reason,
)

if TYPE_CHECKING:
    from sidecar.calls import ToolCall
    from sidecar.gate import Verdict

log = logging.getLogger(__name__)
ROLLBACK_META_KEY = "rollback_token"
# JSON-RPC errors about the request itself: the session is fine. After any other error it is reopened.
_SESSION_INTACT = frozenset({types.INVALID_PARAMS, types.METHOD_NOT_FOUND, types.INVALID_REQUEST})


class _CurrentCredential(httpx2.Auth):
    """Puts the upstream's current credential header on every request of its session."""

    def __init__(self) -> None:
        self.header: tuple[str, str] | None = None

    def auth_flow(self, request: httpx2.Request):
        if self.header is not None:
            request.headers[self.header[0]] = self.header[1]
        yield request


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions[:3])
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class McpUpstream:
    """One upstream MCP server over Streamable HTTP (`url`) or stdio (`command`)."""

    def __init__(
        self,
        name: str,
        *,
        url: str = "",
        command: Sequence[str] = (),
        env: dict[str, str] | None = None,
        credential: CredentialProvider | None = None,
        timeout_seconds: float = 30.0,
        max_result_bytes: int = 1024 * 1024,
        max_backoff_seconds: float = 5.0,
    ):
        if bool(url) == bool(command):
            raise ValueError(f"upstream {name}: exactly one of url and command")
        self.name = name
        self.url = url
        self.command = list(command)
        self._env = env
        self._credential = credential
        self._auth = _CurrentCredential()
        self.timeout_seconds = timeout_seconds
        self.max_result_bytes = max_result_bytes
        self._max_backoff = max_backoff_seconds
        self._client: Client | None = None
        self._connected = asyncio.Event()
        self._broken = asyncio.Event()
        self._stopping = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.last_error = ""
        self._schemas: dict[str, Any] | None = None  # tool name → input schema, from the last listing
        self._ready: dict[str, tuple[Any, InputSchema]] = {}  # tool name → (schema, made ready), once used

    def describe(self) -> str:
        return self.url or " ".join(self.command)

    def _new_client(self, http: httpx2.AsyncClient | None) -> Client:
        if http is not None:
            return Client(streamable_http_client(self.url, http_client=http), cache=None,
                          message_handler=self._on_message)
        params = StdioServerParameters(command=self.command[0], args=self.command[1:], env=self._env)
        return Client(params, cache=None, message_handler=self._on_message)

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self._schemas = None  # the next call lists afresh

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mcp-upstream-{self.name}")

    async def _run(self) -> None:
        backoff = 0.2
        while not self._stopping:
            http = None
            if self.url:  # ours to close: the SDK closes only the HTTP clients it made itself
                # A transport of our own: httpx would otherwise send the call through HTTP(S)_PROXY / ALL_PROXY,
                # so an http:// URL config allowed as loopback would cross the network in clear to a proxy
                # (the HTTP tools' aiohttp session ignores them alike). TLS settings still come from the environment.
                http = httpx2.AsyncClient(auth=self._auth, timeout=httpx2.Timeout(self.timeout_seconds),
                                          transport=httpx2.AsyncHTTPTransport())
            try:
                if self._credential is not None:
                    await self._attach_credential()
                async with self._new_client(http) as client:
                    self._schemas = None  # another session: its listing may differ
                    self._client = client
                    self.last_error = ""
                    backoff = 0.2
                    self._connected.set()
                    await self._broken.wait()
            except CredentialError as exc:
                self.last_error = exc.reason
            except Exception as exc:  # the SDK raises many kinds; each one means "reconnect"
                self.last_error = _describe(exc)
                log.warning("MCP upstream %s (%s): %s", self.name, self.describe(), self.last_error)
            finally:
                self._client = None
                self._connected.clear()
                self._broken.clear()
                if http is not None:
                    await http.aclose()
            if self._stopping:
                break
            try:  # the pause before reconnecting ends early when the upstream is closed
                await asyncio.wait_for(self._stop.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, self._max_backoff)

    async def _attach_credential(self) -> CredentialUse | None:
        if self._credential is None:
            return None
        name, value, use = await self._credential.header()
        self._auth.header = (name, value)
        return use

    async def _session(self) -> Client | None:
        try:
            await asyncio.wait_for(self._connected.wait(), self.timeout_seconds)
        except asyncio.TimeoutError:
            return None
        return self._client

    def _reconnect(self, client: Client) -> None:
        """Have `_run` replace the session `client` belongs to, if it is still the current one.

        From now on calls wait for the next session: the broken one stays `_client` until its
        teardown is over (seconds, for a stdio process), and a call handed it meanwhile would only
        fail. A call that failed on an older session, after `_run` had already replaced it, must not
        end the healthy session that replaced it (and then the next, as calls keep coming)."""
        if client is self._client:
            self._connected.clear()
            self._broken.set()

    async def tools(self) -> list[types.Tool]:
        """The upstream's tools (every page). Raises on failure."""
        client = await self._session()
        if client is None:
            raise ConnectionError(str(Reason(
                UPSTREAM_UNAVAILABLE, f"upstream {self.name} is not connected ({self.last_error or 'connecting'})"
            )))
        await self._attach_credential()
        tools: list[types.Tool] = []
        cursor = None
        try:
            for _ in range(100):
                page = await asyncio.wait_for(client.list_tools(cursor=cursor), self.timeout_seconds)
                tools.extend(page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
        except MCPError as exc:
            if exc.code not in _SESSION_INTACT:
                self._reconnect(client)
            raise
        self._schemas = {tool.name: tool.input_schema for tool in tools}
        return tools

    async def input_schema(self, tool: str) -> InputSchema | None:
        """The input schema `tool` declared in the last listing (listing afresh when it is not there),
        None when the upstream does not list it. Raises as `tools` does when it cannot list. Made ready
        once per schema the listing gives (sidecar/invoke/schemas.py), not once per call."""
        if self._schemas is None or tool not in self._schemas:
            await self.tools()
        schema = (self._schemas or {}).get(tool)
        if schema is None:
            return None
        ready = self._ready.get(tool)
        if ready is None or ready[0] != schema:
            ready = self._ready[tool] = (schema, InputSchema(schema))
        return ready[1]

    async def call(self, tool: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None) -> InvocationResult:
        client = await self._session()
        if client is None:
            return InvocationResult(
                FAILED, self.name,
                error=str(Reason(
                    UPSTREAM_UNAVAILABLE, f"upstream {self.name} is not connected ({self.last_error or 'connecting'})"
                )),
            )
        try:
            credential = await self._attach_credential()
        except CredentialError as exc:
            return InvocationResult(NOT_CALLED, self.name, error=exc.reason)
        try:
            result = await asyncio.wait_for(client.call_tool(tool, arguments, meta=meta), self.timeout_seconds)
        except asyncio.TimeoutError:
            return InvocationResult(
                FAILED, self.name, credential=credential,
                error=str(Reason(
                    UPSTREAM_TIMEOUT, f"upstream {self.name} did not answer within {self.timeout_seconds:g} s"
                )),
            )
        except MCPError as exc:
            if exc.code not in _SESSION_INTACT:
                self._reconnect(client)  # the process exited, the stream ended or the session expired
            if exc.code == types.CONNECTION_CLOSED:
                code = UPSTREAM_UNAVAILABLE
            else:
                code = UPSTREAM_MALFORMED if exc.code == types.PARSE_ERROR else UPSTREAM_ERROR
            return InvocationResult(
                FAILED, self.name, credential=credential, error=str(Reason(
                    code, f"upstream {self.name}: {_describe(exc)}"
                ))
            )
        except Exception as exc:
            self._reconnect(client)  # the session is in an unknown state
            return InvocationResult(
                FAILED, self.name, credential=credential,
                error=str(Reason(UPSTREAM_UNAVAILABLE, f"upstream {self.name} failed ({_describe(exc)})")),
            )
        if not isinstance(result, types.CallToolResult):
            return InvocationResult(
                FAILED, self.name, credential=credential,
                error=str(Reason(
                    UPSTREAM_MALFORMED, f"upstream {self.name} answered {type(result).__name__}, not a tool result"
                )),
            )
        payload = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        try:
            size = len(canonical_json(payload))
        except NotCanonicalizable as exc:
            return InvocationResult(
                FAILED, self.name, credential=credential,
                error=str(Reason(
                    UPSTREAM_MALFORMED, f"upstream {self.name} answered a result with no JSON form ({exc})"
                )),
            )
        if size > self.max_result_bytes:
            return InvocationResult(
                FAILED, self.name, credential=credential,
                error=str(Reason(
                    UPSTREAM_TOO_LARGE,
                    f"upstream {self.name} answered {size} bytes, over the {self.max_result_bytes}-byte cap",
                )),
            )
        token = (result.meta or {}).get(ROLLBACK_META_KEY)
        return InvocationResult(
            TOOL_ERROR if result.is_error else OK,
            self.name,
            result=payload,
            rollback_token=token if isinstance(token, str) else "",
            credential=credential,
        )

    async def aclose(self) -> None:
        self._stopping = True
        self._stop.set()
        self._broken.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except (asyncio.TimeoutError, Exception):
                self._task.cancel()


class McpInvoker:
    """ToolInvoker over named MCP upstreams: `call.server` picks the upstream, `call.tool` the tool."""

    def __init__(self, upstreams: Sequence[McpUpstream]):
        self.upstreams = {u.name: u for u in upstreams}

    def start(self) -> None:
        for upstream in self.upstreams.values():
            upstream.start()

    async def tools(self) -> list[tuple[str, types.Tool]]:
        """Every upstream's tools; an upstream that fails to list is left out (and logged)."""

        async def one(upstream: McpUpstream) -> list[tuple[str, types.Tool]]:
            try:
                return [(upstream.name, tool) for tool in await upstream.tools()]
            except Exception as exc:
                log.warning("MCP upstream %s: tools/list failed: %s", upstream.name, _describe(exc))
                return []

        listed = await asyncio.gather(*(one(u) for u in self.upstreams.values()))
        return [item for group in listed for item in group]

    async def input_schema(self, upstream: str, tool: str) -> InputSchema | None:
        """Upstream `upstream`'s input schema for `tool` (McpUpstream.input_schema); KeyError for no such upstream."""
        return await self.upstreams[upstream].input_schema(tool)

    async def invoke(self, call: "ToolCall", verdict: "Verdict") -> InvocationResult:
        upstream = self.upstreams.get(call.server)
        if upstream is None:
            return InvocationResult(NOT_CALLED, call.server, error=str(Reason(
                UNKNOWN_TOOL, f"no MCP upstream named {call.server!r}"
            )))
        meta = {"traceparent": f"00-{verdict.trace.trace_id}-{verdict.trace.span_id}-01"}
        return await upstream.call(call.tool, dict(call.arguments), meta)

    async def aclose(self) -> None:
        await asyncio.gather(*(u.aclose() for u in self.upstreams.values()))
