"""The back door: the sidecar makes the tool call itself, after an allow that was recorded.

    invoker.invoke(call, verdict) -> InvocationResult   # never raises for upstream faults
    await invoker.aclose()

One ToolInvoker per upstream transport (MCP in `invoke/mcp.py`, HTTP in
`invoke/http.py`), like httpx transports. `invoke/executor.py` composes an
invoker with the obligations (`invoke/obligations.py`) and the `invocation`
evidence record; the front doors (the MCP gateway, `ToolGate.Invoke`) call
only the executor. Upstream failures become reasons `<code>: <text>` with the
codes of sidecar/reasons.py (UPSTREAM_*, UNKNOWN_TOOL, CREDENTIAL_UNAVAILABLE,
OBLIGATION_*), at this boundary (docs/mcp.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sidecar.calls import ToolCall
    from sidecar.gate import Verdict

# InvocationResult.status
OK = "ok"  # the tool ran and answered
TOOL_ERROR = "tool_error"  # the tool ran and reported an error (MCP isError, HTTP 4xx)
FAILED = "failed"  # the call did not complete (see error)
NOT_CALLED = "not_called"  # the sidecar refused to make the call (obligations, credential)


@dataclass(frozen=True)
class CredentialUse:
    """Which credential went with a call: kind and a non-secret id, never the value.

    kind: "jwt_svid" (id: the SVID's SPIFFE ID and audience) or "secret_file"
    (id: the file path and a sha256 prefix of its contents).
    """

    kind: str
    id: str


@dataclass(frozen=True)
class InvocationResult:
    """What one upstream call gave.

    `result` is the tool's answer as JSON (MCP: the CallToolResult's JSON form;
    HTTP: {"status", "headers", "body"}), None when the call failed.
    `error` is "<code>: <text>" when status is failed or not_called.
    """

    status: str
    upstream: str
    result: Any = None
    error: str = ""
    rollback_token: str = ""
    upstream_status: int | None = None  # HTTP status code, when there was one
    credential: CredentialUse | None = None
    details: dict[str, Any] = field(default_factory=dict)


class ToolInvoker(Protocol):
    """Performs an allowed call against its upstream. Never raises for upstream faults."""

    async def invoke(self, call: "ToolCall", verdict: "Verdict") -> InvocationResult: ...

    async def aclose(self) -> None: ...
