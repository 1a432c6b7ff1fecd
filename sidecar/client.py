"""The agent-side library: ask the sidecar before a tool runs.

    client = Client("unix:/run/agent-sidecar/sidecar.sock")
    result = client.authorize("read_file", {"path": "/workspace/a.txt"})

    @client.guard()
    def read_file(path: str) -> str: ...

A guarded function runs only on ALLOW; DENY raises AuthorizationDenied with
the reasons, ESCALATE raises EscalationRequired with the escalation id.
Arguments, signals and every other Struct go out exactly or not at all: a
value the sidecar would receive changed (an integer beyond ±(2^53−1), NaN,
Infinity, a non-string key, a non-JSON value) raises NotExact naming the
field before anything is sent (docs/api.md, "Numbers"). The guard decides on
a private copy of the arguments and runs the function with that copy, only
when the sidecar's `arguments_digest` is the copy's digest (ArgumentsChanged
otherwise): changing the caller's objects while a human decides changes
nothing. An allow whose obligations change the call's arguments (drop,
redact, clamp or cap them) does not run the function either
(ObligationsNotApplied): only the sidecar applies those. With
`Client(..., escalation_timeout=600)` the guard instead waits (AwaitDecision)
for a human to decide and then repeats the call with the escalation id, so
an approved call runs and tool code needs no change (docs/escalation.md).
`AsyncClient` is the same for asyncio agents, closed by `aclose()` (or `async with`)
where `Client` has `close()` (or `with`).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import grpc
from google.protobuf.struct_pb2 import Struct

from sidecar.canonical import canonical_json, sha256_digest
from sidecar.invoke.obligations import CALL_OBLIGATIONS
from sidecar.jsonvalues import NotExact, from_struct, to_json_value, to_struct
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

if TYPE_CHECKING:  # py-spiffe is imported only by the agents that use these helpers
    from spiffe import JwtSource, WorkloadApiClient, X509Source

__all__ = [
    "ArgumentsChanged", "AsyncClient", "AuthorizationDenied", "AuthorizationResult", "Client", "EscalationDecision",
    "EscalationRequired", "JwtSvidAuth", "NotExact", "ObligationsNotApplied", "SpiffeMtls", "arguments_digest",
    "delegated_by",
]

MetadataProvider = Callable[[], Sequence[tuple[str, str]]]

# SPIFFE identity for the agent side (docs/identity.md).
DELEGATION_METADATA = "x-spiffe-delegation"
_DELEGATION: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("sidecar_delegation", default=())


@contextlib.contextmanager
def delegated_by(*jwt_svids: str):
    """Calls made inside carry these upstream agents' JWT-SVIDs (outermost first).

        with delegated_by(orchestrator_token, planner_token):
            client.authorize("read_file", {...})

    Each token must be minted for the sidecar's delegation audience; one bad
    link and the call is denied naming it. Works across asyncio tasks
    (contextvars).
    """
    for token in jwt_svids:
        if not token or "," in token or any(c.isspace() for c in token):
            raise ValueError("each delegation link is one JWT-SVID (no commas or spaces)")
    reset = _DELEGATION.set(tuple(jwt_svids))
    try:
        yield
    finally:
        _DELEGATION.reset(reset)


class SpiffeMtls:
    """mTLS to the sidecar with the agent's X.509-SVID from a py-spiffe X509Source.

        source = X509Source(timeout_in_seconds=10)      # SPIFFE_ENDPOINT_SOCKET
        client = Client("sidecar.local:50051", credentials=SpiffeMtls(source, "sidecar.local"))

    `server_name` must be a DNS SAN of the sidecar's SVID: grpc's Python client
    checks the server's hostname (it cannot check a SPIFFE ID), so it is passed
    as `grpc.ssl_target_name_override`. When the source rotates the SVID the
    client builds a new channel before its next call.
    """

    def __init__(self, x509_source: "X509Source", server_name: str):
        if not server_name:
            raise ValueError("server_name: a DNS SAN of the sidecar's SVID is needed (grpc checks hostnames)")
        self._source = x509_source
        self.server_name = server_name
        self.version = 0
        x509_source.subscribe_for_updates(self._rotated)

    def _rotated(self) -> None:
        self.version += 1

    def channel_credentials(self) -> grpc.ChannelCredentials:
        from sidecar.identity.mtls import x509_source_channel_credentials

        return x509_source_channel_credentials(self._source)


def _channel_settings(
    credentials: grpc.ChannelCredentials | SpiffeMtls | None, options: list[tuple[str, Any]]
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]], int]:
    if isinstance(credentials, SpiffeMtls):
        version = credentials.version
        extra = [] if any(k == "grpc.ssl_target_name_override" for k, _ in options) else [
            ("grpc.ssl_target_name_override", credentials.server_name)
        ]
        return credentials.channel_credentials(), [*options, *extra], version
    return credentials, options, 0


def _jwt_svid_fetch(source: "JwtSource | WorkloadApiClient") -> Callable[..., Any]:
    """The JWT-SVID fetch of a py-spiffe source: the two name the same call differently."""
    from spiffe import JwtSource, WorkloadApiClient

    if isinstance(source, JwtSource):
        return source.fetch_svid
    if isinstance(source, WorkloadApiClient):
        return source.fetch_jwt_svid
    raise TypeError(f"source: a py-spiffe JwtSource or WorkloadApiClient, not {type(source).__name__}")


class JwtSvidAuth:
    """`authorization: Bearer <JWT-SVID>` metadata from the Workload API, cached until near expiry.

        auth = JwtSvidAuth("spiffe://example.org/ns/agents/sa/sidecar")   # the sidecar's jwt_audience
        client = Client("unix:/run/agent-sidecar/sidecar.sock", metadata=auth)

    `source` is a py-spiffe JwtSource or WorkloadApiClient (default: a
    WorkloadApiClient on SPIFFE_ENDPOINT_SOCKET). The audience is sent as a
    set, as py-spiffe requires. Fetching is a short unary call on the local
    agent socket, made only when the cached token is within `refresh_margin`
    seconds of expiry.
    """

    def __init__(
        self, audience: str, *, source: "JwtSource | WorkloadApiClient | None" = None, refresh_margin: float = 30.0
    ):
        if not audience:
            raise ValueError("audience: the sidecar's identity.jwt_audience is needed")
        self._fetch = None if source is None else _jwt_svid_fetch(source)  # None: the default source, made at first use
        self.audience = audience
        self._margin = refresh_margin
        self._lock = threading.Lock()
        self._token = ""
        self._expiry = 0.0

    def token(self) -> str:
        with self._lock:
            if not self._token or time.time() >= self._expiry - self._margin:
                if self._fetch is None:
                    from spiffe import WorkloadApiClient

                    self._fetch = WorkloadApiClient(default_timeout=5).fetch_jwt_svid
                svid = self._fetch(audience={self.audience})
                self._token, self._expiry = svid.token, float(svid.expiry)
            return self._token

    def __call__(self) -> Sequence[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token()}"),)

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
    # sha256 of the canonical JSON of the arguments as the sidecar decided them (arguments_digest()).
    arguments_digest: str = ""

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
    return None if value is None else to_struct(value, what)


def arguments_digest(arguments: dict[str, Any]) -> str:
    """"sha256:<hex>" of the arguments' RFC 8785 canonical JSON: what the sidecar decides on and records.

    Raises NotExact (naming the field) for a value the sidecar could not be sent exactly."""
    return sha256_digest(canonical_json(to_json_value(arguments, "arguments")))


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
        obligations=from_struct(response.obligations),
        arguments_digest=response.arguments_digest,
    )


class ArgumentsChanged(PermissionError):
    """The sidecar allowed arguments other than the ones the tool would run with; the tool did not run."""

    def __init__(self, tool: str, result: AuthorizationResult, expected: str):
        super().__init__(
            f"{tool}: not run: the sidecar decided on arguments {result.arguments_digest or '(no digest)'}, "
            f"the tool would run with {expected} (decision {result.decision_id})"
        )
        self.tool = tool
        self.result = result


class ObligationsNotApplied(PermissionError):
    """Policy allowed the call on conditions that change its arguments (the obligations
    `drop_arguments`, `redact_call_arguments`, `clamp_arguments`, `cap_list_arguments`); the guard
    cannot apply them to a Python call, so the tool did not run. Make such calls through the
    sidecar (Invoke, the MCP gateway), which applies them. Other obligations are the caller's to
    read (`result.obligations`) and do not stop the call."""

    def __init__(self, tool: str, result: AuthorizationResult, obligations: list[str]):
        super().__init__(
            f"{tool}: not run: policy allowed it with obligation(s) {', '.join(obligations)} that change the "
            f"call, which the guard cannot apply (decision {result.decision_id})"
        )
        self.tool = tool
        self.result = result
        self.obligations = obligations


def _raise_unless_allowed(tool: str, result: AuthorizationResult, digest: str) -> None:
    if result.outcome == "escalate":
        raise EscalationRequired(tool, result)
    if result.outcome != "allow":
        raise AuthorizationDenied(tool, result)
    if result.arguments_digest != digest:
        raise ArgumentsChanged(tool, result, digest)
    unapplied = sorted(key for key in result.obligations if key in CALL_OBLIGATIONS)
    if unapplied:  # the tool would receive other arguments than policy allowed
        raise ObligationsNotApplied(tool, result, unapplied)


def _call_arguments(function: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _pinned_call(function: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict, dict[str, Any], str]:
    """(args, kwargs, arguments, digest) of a private copy: what is decided is what runs, even if the
    caller's objects change while a human decides. Raises NotExact before copying anything odd."""
    arguments_digest(_call_arguments(function, args, kwargs))
    args, kwargs = copy.deepcopy((args, kwargs))
    arguments = _call_arguments(function, args, kwargs)
    return args, kwargs, arguments, arguments_digest(arguments)


@dataclass(frozen=True)
class EscalationDecision:
    """Where an escalation stands after AwaitDecision."""

    escalation_id: str
    state: str  # pending | approved | denied | expired | used
    approver: str = ""
    note: str = ""
    timed_out: bool = False


_STATES = {
    sidecar_pb2.ESCALATION_STATE_PENDING: "pending",
    sidecar_pb2.ESCALATION_STATE_APPROVED: "approved",
    sidecar_pb2.ESCALATION_STATE_DENIED: "denied",
    sidecar_pb2.ESCALATION_STATE_EXPIRED: "expired",
    sidecar_pb2.ESCALATION_STATE_USED: "used",
}


def decision_from_response(response: sidecar_pb2.AwaitDecisionResponse) -> EscalationDecision:
    escalation = response.escalation
    return EscalationDecision(
        escalation_id=escalation.escalation_id,
        state=_STATES.get(escalation.state, "pending"),
        approver=escalation.approver,
        note=escalation.note,
        timed_out=response.timed_out,
    )


def _await_request(escalation_id: str, remaining: float) -> sidecar_pb2.AwaitDecisionRequest:
    return sidecar_pb2.AwaitDecisionRequest(escalation_id=escalation_id, timeout_seconds=max(0.0, remaining))


class _ClientBase:
    def __init__(self, metadata: MetadataProvider | None, timeout: float, escalation_timeout: float = 0.0):
        self._metadata_provider = metadata
        self._timeout = timeout
        # How long authorize_waiting and the guard wait for a human; 0 = not at all.
        self._escalation_timeout = escalation_timeout

    def _metadata(self) -> Sequence[tuple[str, str]] | None:
        pairs = list(self._metadata_provider()) if self._metadata_provider else []
        chain = _DELEGATION.get()
        if chain and not any(key == DELEGATION_METADATA for key, _ in pairs):
            pairs.append((DELEGATION_METADATA, ",".join(chain)))
        return tuple(pairs) if pairs else None


class Client(_ClientBase):
    """Synchronous client. `target` is "host:port" or "unix:/path"."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | SpiffeMtls | None = None,
        metadata: MetadataProvider | None = None,
        timeout: float = 5.0,
        options: Sequence[tuple[str, Any]] = (),
        escalation_timeout: float = 0.0,
    ):
        super().__init__(metadata, timeout, escalation_timeout)
        self._target, self._credentials, self._options = target, credentials, list(options)
        self._retired: list[grpc.Channel] = []
        self._connect()

    def _connect(self) -> None:
        credentials, options, self._credentials_version = _channel_settings(self._credentials, self._options)
        self._channel = (
            grpc.secure_channel(self._target, credentials, options=options)
            if credentials
            else grpc.insecure_channel(self._target, options=options)
        )
        self._stub = sidecar_pb2_grpc.ToolGateStub(self._channel)

    def _current_stub(self) -> Any:
        if isinstance(self._credentials, SpiffeMtls) and self._credentials.version != self._credentials_version:
            # The SVID rotated: new connections must present the new one. The old
            # channel is closed later, so calls in flight on it finish.
            for old in self._retired:
                old.close()
            self._retired = [self._channel]
            self._connect()
        return self._stub

    def authorize(self, tool: str, arguments: dict[str, Any] | None = None, **fields: Any) -> AuthorizationResult:
        request = build_request(tool, arguments, **fields)
        response = self._current_stub().Authorize(request, timeout=self._timeout, metadata=self._metadata())
        return result_from_response(response)

    def await_decision(self, escalation_id: str, timeout: float) -> EscalationDecision:
        """Wait up to `timeout` seconds for a human to decide the escalation (or for it to expire)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            response = self._current_stub().AwaitDecision(
                _await_request(escalation_id, remaining),
                timeout=max(0.0, remaining) + self._timeout,
                metadata=self._metadata(),
            )
            decision = decision_from_response(response)
            if not decision.timed_out or deadline - time.monotonic() <= 0.05:
                return decision

    def authorize_waiting(
        self, tool: str, arguments: dict[str, Any] | None = None, *, wait: float | None = None, **fields: Any
    ) -> AuthorizationResult:
        """authorize(); on ESCALATE wait up to `wait` s (default escalation_timeout) for a human,
        then repeat the call with the escalation id so the sidecar decides it with the approval."""
        result = self.authorize(tool, arguments, **fields)
        wait = self._escalation_timeout if wait is None else wait
        if result.outcome != "escalate" or not result.escalation_id or wait <= 0:
            return result
        try:
            decision = self.await_decision(result.escalation_id, wait)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a sidecar without escalations
                return result
            raise
        if decision.state == "pending":
            return result
        return self.authorize(tool, arguments, **{**fields, "escalation_id": result.escalation_id})

    def guard(self, tool: str | None = None, **fields: Any) -> Callable[[Callable], Callable]:
        """Decorate a tool function so it runs only when the sidecar allows the call."""

        def decorate(function: Callable) -> Callable:
            name = tool or function.__name__

            @functools.wraps(function)
            def guarded(*args: Any, **kwargs: Any) -> Any:
                args, kwargs, arguments, digest = _pinned_call(function, args, kwargs)
                result = self.authorize_waiting(name, arguments, **fields)
                _raise_unless_allowed(name, result, digest)
                return function(*args, **kwargs)

            return guarded

        return decorate

    def close(self) -> None:
        for old in self._retired:
            old.close()
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
        credentials: grpc.ChannelCredentials | SpiffeMtls | None = None,
        metadata: MetadataProvider | None = None,
        timeout: float = 5.0,
        options: Sequence[tuple[str, Any]] = (),
        escalation_timeout: float = 0.0,
    ):
        super().__init__(metadata, timeout, escalation_timeout)
        self._target, self._credentials, self._options = target, credentials, list(options)
        self._retired: list[grpc.aio.Channel] = []
        self._connect()

    def _connect(self) -> None:
        credentials, options, self._credentials_version = _channel_settings(self._credentials, self._options)
        self._channel = (
            grpc.aio.secure_channel(self._target, credentials, options=options)
            if credentials
            else grpc.aio.insecure_channel(self._target, options=options)
        )
        self._stub = sidecar_pb2_grpc.ToolGateStub(self._channel)

    async def _current_stub(self) -> Any:
        if isinstance(self._credentials, SpiffeMtls) and self._credentials.version != self._credentials_version:
            for old in self._retired:
                await old.close()
            self._retired = [self._channel]
            self._connect()
        return self._stub

    async def authorize(self, tool: str, arguments: dict[str, Any] | None = None, **fields: Any) -> AuthorizationResult:
        request = build_request(tool, arguments, **fields)
        stub = await self._current_stub()
        response = await stub.Authorize(request, timeout=self._timeout, metadata=self._metadata())
        return result_from_response(response)

    async def await_decision(self, escalation_id: str, timeout: float) -> EscalationDecision:
        """Wait up to `timeout` seconds for a human to decide the escalation (or for it to expire)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            stub = await self._current_stub()
            response = await stub.AwaitDecision(
                _await_request(escalation_id, remaining),
                timeout=max(0.0, remaining) + self._timeout,
                metadata=self._metadata(),
            )
            decision = decision_from_response(response)
            if not decision.timed_out or deadline - time.monotonic() <= 0.05:
                return decision

    async def authorize_waiting(
        self, tool: str, arguments: dict[str, Any] | None = None, *, wait: float | None = None, **fields: Any
    ) -> AuthorizationResult:
        """authorize(); on ESCALATE wait up to `wait` s (default escalation_timeout) for a human,
        then repeat the call with the escalation id so the sidecar decides it with the approval."""
        result = await self.authorize(tool, arguments, **fields)
        wait = self._escalation_timeout if wait is None else wait
        if result.outcome != "escalate" or not result.escalation_id or wait <= 0:
            return result
        try:
            decision = await self.await_decision(result.escalation_id, wait)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return result
            raise
        if decision.state == "pending":
            return result
        return await self.authorize(tool, arguments, **{**fields, "escalation_id": result.escalation_id})

    def guard(self, tool: str | None = None, **fields: Any) -> Callable[[Callable], Callable]:
        """Decorate an async tool function so it runs only when the sidecar allows the call."""

        def decorate(function: Callable) -> Callable:
            if not inspect.iscoroutinefunction(function):
                raise TypeError("AsyncClient.guard wraps async functions; use Client.guard for plain ones")
            name = tool or function.__name__

            @functools.wraps(function)
            async def guarded(*args: Any, **kwargs: Any) -> Any:
                args, kwargs, arguments, digest = _pinned_call(function, args, kwargs)
                result = await self.authorize_waiting(name, arguments, **fields)
                _raise_unless_allowed(name, result, digest)
                return await function(*args, **kwargs)

            return guarded

        return decorate

    async def aclose(self) -> None:
        for old in self._retired:
            await old.close()
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
