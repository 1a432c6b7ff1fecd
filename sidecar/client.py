"""The agent-side library: ask the sidecar before a tool runs.

    client = Client("unix:/run/agent-sidecar/sidecar.sock")
    result = client.authorize("read_file", {"path": "/workspace/a.txt"})

    @client.guard()
    def read_file(path: str) -> str: ...

A guarded function runs only on ALLOW; DENY raises AuthorizationDenied with
the reasons, ESCALATE raises EscalationRequired with the escalation id.
`AsyncClient` is the same for asyncio agents.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import grpc
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

MetadataProvider = Callable[[], Sequence[tuple[str, str]]]

_OUTCOMES = {
    sidecar_pb2.OUTCOME_ALLOW: "allow",
    sidecar_pb2.OUTCOME_DENY: "deny",
    sidecar_pb2.OUTCOME_ESCALATE: "escalate",
}


@dataclass(frozen=True)
class AuthorizationResult:
    outcome: str  # allow | deny | escalate
    reasons: tuple[str, ...]
    decision_id: str
    escalation_id: str = ""
    policy_revision: str = ""
    trace_id: str = ""
    obligations: dict[str, Any] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"


class AuthorizationDenied(PermissionError):
    """Policy denied the call; `reasons` says why."""

    def __init__(self, tool: str, result: AuthorizationResult):
        super().__init__(f"{tool}: denied by policy: {'; '.join(result.reasons)} (decision {result.decision_id})")
        self.tool = tool
        self.result = result
        self.reasons = result.reasons


class EscalationRequired(PermissionError):
    """Policy wants a human to approve the call first."""

    def __init__(self, tool: str, result: AuthorizationResult):
        super().__init__(
            f"{tool}: needs approval (escalation {result.escalation_id or 'unknown'}): {'; '.join(result.reasons)}"
        )
        self.tool = tool
        self.result = result
        self.escalation_id = result.escalation_id
        self.reasons = result.reasons


def _struct(value: dict[str, Any] | None, what: str) -> Struct | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict of JSON values, not {type(value).__name__}")
    try:
        plain = json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must hold only JSON values: {exc}") from None
    message = Struct()
    message.update(plain)
    return message


def build_request(
    tool: str,
    arguments: dict[str, Any] | None = None,
    *,
    server: str = "",
    call_id: str = "",
    task_id: str = "",
    intent: str = "",
    signals: dict[str, Any] | None = None,
    escalation_id: str = "",
) -> sidecar_pb2.AuthorizeRequest:
    return sidecar_pb2.AuthorizeRequest(
        tool=tool,
        arguments=_struct(arguments or {}, "arguments"),
        call_id=call_id,
        task_id=task_id,
        intent=intent,
        signals=_struct(signals, "signals"),
        escalation_id=escalation_id,
        server=server,
    )


def result_from_response(response: sidecar_pb2.AuthorizeResponse) -> AuthorizationResult:
    return AuthorizationResult(
        outcome=_OUTCOMES.get(response.outcome, "deny"),
        reasons=tuple(response.reasons),
        decision_id=response.decision_id,
        escalation_id=response.escalation_id,
        policy_revision=response.policy_revision,
        trace_id=response.trace_id,
        obligations=json_format.MessageToDict(response.obligations),
    )


def _raise_unless_allowed(tool: str, result: AuthorizationResult) -> None:
    if result.outcome == "escalate":
        raise EscalationRequired(tool, result)
    if result.outcome != "allow":
        raise AuthorizationDenied(tool, result)


def _call_arguments(function: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


class _ClientBase:
    def __init__(self, metadata: MetadataProvider | None, timeout: float):
        self._metadata_provider = metadata
        self._timeout = timeout

    def _metadata(self) -> Sequence[tuple[str, str]] | None:
        return tuple(self._metadata_provider()) if self._metadata_provider else None


class Client(_ClientBase):
    """Synchronous client. `target` is "host:port" or "unix:/path"."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: MetadataProvider | None = None,
        timeout: float = 5.0,
        options: Sequence[tuple[str, Any]] = (),
    ):
        super().__init__(metadata, timeout)
        self._channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials
            else grpc.insecure_channel(target, options=options)
        )
        self._stub = sidecar_pb2_grpc.ToolGateStub(self._channel)

    def authorize(self, tool: str, arguments: dict[str, Any] | None = None, **fields: Any) -> AuthorizationResult:
        request = build_request(tool, arguments, **fields)
        response = self._stub.Authorize(request, timeout=self._timeout, metadata=self._metadata())
        return result_from_response(response)

    def guard(self, tool: str | None = None, **fields: Any) -> Callable[[Callable], Callable]:
        """Decorate a tool function so it runs only when the sidecar allows the call."""

        def decorate(function: Callable) -> Callable:
            name = tool or function.__name__

            @functools.wraps(function)
            def guarded(*args: Any, **kwargs: Any) -> Any:
                result = self.authorize(name, _call_arguments(function, args, kwargs), **fields)
                _raise_unless_allowed(name, result)
                return function(*args, **kwargs)

            return guarded

        return decorate

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """asyncio client. `target` is "host:port" or "unix:/path"."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: MetadataProvider | None = None,
        timeout: float = 5.0,
        options: Sequence[tuple[str, Any]] = (),
    ):
        super().__init__(metadata, timeout)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._stub = sidecar_pb2_grpc.ToolGateStub(self._channel)

    async def authorize(self, tool: str, arguments: dict[str, Any] | None = None, **fields: Any) -> AuthorizationResult:
        request = build_request(tool, arguments, **fields)
        response = await self._stub.Authorize(request, timeout=self._timeout, metadata=self._metadata())
        return result_from_response(response)

    def guard(self, tool: str | None = None, **fields: Any) -> Callable[[Callable], Callable]:
        """Decorate an async tool function so it runs only when the sidecar allows the call."""

        def decorate(function: Callable) -> Callable:
            if not inspect.iscoroutinefunction(function):
                raise TypeError("AsyncClient.guard wraps async functions; use Client.guard for plain ones")
            name = tool or function.__name__

            @functools.wraps(function)
            async def guarded(*args: Any, **kwargs: Any) -> Any:
                result = await self.authorize(name, _call_arguments(function, args, kwargs), **fields)
                _raise_unless_allowed(name, result)
                return await function(*args, **kwargs)

            return guarded

        return decorate

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
