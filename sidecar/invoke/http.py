"""The HTTP invoker: tools that are plain HTTP endpoints, called by ToolGate.Invoke after an allow.

    tool = HttpTool("create_ticket", method="POST", url="https://tickets.internal/api/{project}/issues",
                    headers={...}, timeout_seconds=10, max_response_bytes=1 << 20,
                    rollback_header="x-rollback-token", credential=SecretFileCredential(...))
    invoker = HttpInvoker([tool, ...])
    await invoker.invoke(call, verdict) -> InvocationResult      # never raises for upstream faults
    await invoker.aclose()

The request: `{name}` in the URL template takes the URL-quoted argument
`name` (which is then not sent again; a path segment it would leave `.`, `..`
or empty is refused, not_called invalid_arguments: the client would resolve
it to another path; so is an argument named like a query parameter the URL
fixes, compared without case: servers read a repeated parameter differently);
the other arguments go as the JSON
body (POST, PUT, PATCH) or the query string (GET, DELETE; objects and lists
JSON-encoded). A string argument sent as URL text (a placeholder; the query of
a GET or DELETE) whose text is exactly how another JSON value is written there
(`"true"`, `"5"`, `"[1,2]"`, `"null"`) is refused, not_called
invalid_arguments: the tool would get the same text for both values, policy
decided on one; unless the tool has an `input_schema`, whose types decided
which value it is. So is a placeholder value whose `/` or `\\` would stand
next to a dot segment or another separator (`../admin`): servers that decode
`%2F` before routing take the request elsewhere. Headers: the configured ones,
then the credential's. Redirects are not followed. The result is
{"status": int, "body": JSON or text}: 2xx → ok, other statuses below 500 →
tool_error, 5xx → failed (upstream_error). A body over `max_response_bytes` →
failed (upstream_too_large); a JSON content type with a body that does not
parse, or with numbers the numbers rule refuses (sidecar/jsonvalues.py: they
would reach the agent changed) → failed (upstream_malformed). The rollback
token is the `rollback_header` response header, when present.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import parse_qsl, quote

import aiohttp

from sidecar.canonical import parse_json
from sidecar.invoke import FAILED, NOT_CALLED, OK, TOOL_ERROR, InvocationResult
from sidecar.invoke.credentials import CredentialError, CredentialProvider
from sidecar.invoke.schemas import InputSchema
from sidecar.jsonvalues import child_path, normalize, number_problems
from sidecar.reasons import (
    INVALID_ARGUMENTS,
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

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class HttpTool:
    name: str
    url: str
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float = 10.0
    max_response_bytes: int = 1024 * 1024
    rollback_header: str = "x-rollback-token"
    credential: CredentialProvider | None = None
    input_schema: InputSchema | None = None  # sidecar/invoke/schemas.py


def _query_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_DOT_SEGMENTS = ("", ".", "..")


def _path_escape(template: str, url: str) -> str:
    """Why `url` (the template filled in) would not reach the path the template names, or "".

    Quoting keeps an argument inside its segment (`/` becomes %2F), but `.` and `..` are
    unreserved: the HTTP client resolves them (yarl, even as %2E%2E) and the request goes to
    another path. A segment that an argument filled is refused when it is `.`, `..` or empty
    (`//`, which many servers merge)."""
    template_path = template.split("?", 1)[0].split("#", 1)[0]
    url_path = url.split("?", 1)[0].split("#", 1)[0]
    template_segments = template_path.split("/")
    url_segments = url_path.split("/")
    if len(template_segments) != len(url_segments):  # cannot happen: quoted values hold no "/"
        return "an argument would change the URL's path"
    for written, filled in zip(template_segments, url_segments):
        names = _PLACEHOLDER.findall(written)
        if names and filled in _DOT_SEGMENTS:
            shown = "empty" if not filled else repr(filled)
            return (f"argument(s) {', '.join(names)} would make the path segment {written!r} {shown}, "
                    "which sends the request to another path than the tool's URL names")
        # Servers and proxies that decode %2F (or %5C) before routing (nginx normalizing a URI it
        # proxies, IIS reading a backslash as a slash) see the quoted separators again: a piece
        # between them that is a dot segment or empty takes the request elsewhere there.
        pieces = re.split(r"%2F|%5C", filled)
        if names and len(pieces) > 1 and any(piece in _DOT_SEGMENTS for piece in pieces):
            return (f"argument(s) {', '.join(names)} would put a '/' or '\\' next to a '.', '..' or another "
                    f"separator in the path segment {written!r}, which servers that decode it before routing "
                    "resolve to another path than the tool's URL names")
    return ""


def _text_of_another_value(arguments: dict[str, Any], names: Sequence[str]) -> str:
    """Why an argument sent as URL text (a path placeholder; the query of a GET or DELETE) would
    arrive as text another JSON value also arrives as, or "".

    The URL carries text: the boolean true and the string "true" both arrive as `true`, 5 and "5"
    as `5`, [1,2] and "[1,2]" as `[1,2]`. Policy tells them apart (a rule denying `force == true`
    lets "true" through) and the tool cannot, so a string whose text is exactly how another value
    the sidecar would carry is written is refused: the agent sends that value itself."""
    for name in names:
        value = arguments[name]
        if not isinstance(value, str):
            continue
        try:
            parsed = normalize(parse_json(value))
        except ValueError:
            continue
        if not isinstance(parsed, str) and not number_problems(parsed, name) and _query_value(parsed) == value:
            return (f"{child_path('arguments', name)} is a string whose text the URL would carry exactly as it "
                    f"carries the {_json_kind(parsed)} it spells, so the tool could not tell which was decided; "
                    "send that value itself, not as a string")
    return ""


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return {dict: "object", list: "array"}.get(type(value), "number")


def _shadowed_query(url: str, arguments: dict[str, Any]) -> str:
    """Why an argument would repeat a query parameter the URL fixes, or "".

    Sent, it would make `?mode=safe&mode=admin` (or, in a JSON body, a parameter that frameworks
    merging body over query read instead), and servers read a repeated parameter differently (the
    first, the last, a list; some without case): the tool could run with the agent's value instead
    of the operator's."""
    query = url.split("#", 1)[0].partition("?")[2]
    if not query:
        return ""
    fixed = {key.casefold() for key, _ in parse_qsl(query, keep_blank_values=True)}
    clash = sorted(name for name in arguments if name.casefold() in fixed)
    if not clash:
        return ""
    return (f"argument(s) {', '.join(clash)} would repeat a query parameter the tool's URL fixes, "
            "which the tool could read in place of the URL's")


class HttpInvoker:
    def __init__(self, tools: Sequence[HttpTool]):
        self.tools = {t.name: t for t in tools}
        self._session: aiohttp.ClientSession | None = None

    def knows(self, tool: str) -> bool:
        return tool in self.tools

    def as_the_tool_reads(self, call: "ToolCall") -> tuple["ToolCall", str]:
        """The call with its arguments as the tool reads them by its `input_schema` (defaults filled
        in), and why the tool would read them as another value ("invalid_arguments: …") or "";
        the call unchanged when the tool has no schema (sidecar/invoke/schemas.py). Before policy."""
        schema = self.tools[call.tool].input_schema
        if schema is None or not isinstance(call.arguments, dict):
            return call, ""
        filled, refused = schema.read(normalize(call.arguments))
        return replace(call, arguments=filled), str(Reason(INVALID_ARGUMENTS, refused)) if refused else ""

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(auto_decompress=True, trust_env=False)
        return self._session

    async def invoke(self, call: "ToolCall", verdict: "Verdict") -> InvocationResult:
        tool = self.tools.get(call.tool)
        if tool is None:
            return InvocationResult(NOT_CALLED, "", error=str(Reason(
                UNKNOWN_TOOL, f"no HTTP tool named {call.tool!r} in invoke.tools"
            )))
        arguments = dict(call.arguments)
        missing = [n for n in _PLACEHOLDER.findall(tool.url) if n not in arguments]
        if missing:
            return InvocationResult(
                NOT_CALLED, tool.url,
                error=str(Reason(INVALID_ARGUMENTS, f"the URL of {tool.name} needs argument(s) {', '.join(missing)}")),
            )
        placed = set(_PLACEHOLDER.findall(tool.url))  # a placeholder may appear more than once
        method = tool.method.upper()
        as_text = sorted(placed | (set(arguments) if method in ("GET", "DELETE") else set()))
        url = _PLACEHOLDER.sub(lambda m: quote(_query_value(arguments[m.group(1)]), safe=""), tool.url)
        # A tool with an input schema was judged by it before policy (as_the_tool_reads): its types say
        # how the text reads.
        ambiguous = "" if tool.input_schema is not None else _text_of_another_value(arguments, as_text)
        for name in placed:
            del arguments[name]
        escaped = _path_escape(tool.url, url) or _shadowed_query(url, arguments) or ambiguous
        if escaped:
            return InvocationResult(NOT_CALLED, tool.url, error=str(Reason(INVALID_ARGUMENTS, escaped)))
        upstream = url.split("?", 1)[0]
        headers = dict(tool.headers)
        headers["traceparent"] = f"00-{verdict.trace.trace_id}-{verdict.trace.span_id}-01"
        credential = None
        if tool.credential is not None:
            try:
                name, value, credential = await tool.credential.header()
            except CredentialError as exc:
                return InvocationResult(NOT_CALLED, upstream, error=exc.reason)
            headers[name] = value
        kwargs: dict[str, Any] = {}
        if method in ("GET", "DELETE"):
            kwargs["params"] = {k: _query_value(v) for k, v in arguments.items()}
        else:
            kwargs["json"] = arguments

        def failed(error: str, status: int | None = None) -> InvocationResult:
            return InvocationResult(FAILED, upstream, error=error, upstream_status=status, credential=credential)

        try:
            async with asyncio.timeout(tool.timeout_seconds):
                async with self._client().request(
                    method, url, headers=headers, allow_redirects=False, **kwargs
                ) as response:
                    body = await response.content.read(tool.max_response_bytes + 1)
                    status = response.status
                    content_type = response.headers.get("content-type", "")
                    token = response.headers.get(tool.rollback_header, "") if tool.rollback_header else ""
        except TimeoutError:
            return failed(str(Reason(
                UPSTREAM_TIMEOUT, f"{tool.name} at {upstream} did not answer within {tool.timeout_seconds:g} s"
            )))
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            return failed(str(Reason(UPSTREAM_UNAVAILABLE, f"TLS with {upstream} failed ({type(exc).__name__})")))
        except (aiohttp.ClientError, OSError) as exc:
            return failed(str(Reason(
                UPSTREAM_UNAVAILABLE, f"{tool.name} at {upstream} could not be reached ({type(exc).__name__}: {exc})"
            )))
        if len(body) > tool.max_response_bytes:
            return failed(
                str(Reason(
                    UPSTREAM_TOO_LARGE, f"{tool.name} answered more than the {tool.max_response_bytes}-byte cap"
                )), status
            )
        if "json" in content_type.lower():
            try:
                payload: Any = json.loads(body) if body else None
            except ValueError:
                return failed(str(Reason(
                    UPSTREAM_MALFORMED, f"{tool.name} answered {content_type} that does not parse"
                )), status)
            inexact = number_problems(payload, "body")
            if inexact:  # the agent (a protobuf Struct) would get other numbers than the tool gave
                return failed(str(Reason(UPSTREAM_MALFORMED, f"{tool.name} answered {'; '.join(inexact[:3])}")), status)
        else:
            payload = body.decode("utf-8", "replace")
        result = {"status": status, "body": payload}
        if status >= 500:
            return InvocationResult(
                FAILED, upstream, result=result, upstream_status=status, credential=credential,
                error=str(Reason(UPSTREAM_ERROR, f"{tool.name} answered HTTP {status}")),
            )
        return InvocationResult(
            OK if 200 <= status < 300 else TOOL_ERROR,
            upstream,
            result=result,
            rollback_token=token,
            upstream_status=status,
            credential=credential,
        )

    async def __aenter__(self) -> "HttpInvoker":
        return self  # the session is made by the first call

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
