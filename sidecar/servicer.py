"""The gRPC face of the gate: ToolGate.Authorize over grpc.aio.

Translates protobuf to a ToolCall and the transport to a PeerInfo, asks the
identity resolver who is calling, and leaves every decision to the Gate. A
request that cannot even be parsed (e.g. non-UTF-8 strings) is still recorded
as a denied call and answered INVALID_ARGUMENT with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from sidecar.calls import MAX_ID_BYTES, ToolCall, usable_id
from sidecar.evidence import TraceContext
from sidecar.gate import Gate, Verdict
from sidecar.identity import (
    PEER_AUTH_KEYS,
    CallerIdentity,
    IdentityError,
    IdentityResolver,
    PeerInfo,
    resolve_caller,
)
from sidecar.jsonvalues import NotExact, from_struct, to_struct
from sidecar.reasons import (
    INVALID_SERVER,
    INVALID_TASK,
    MALFORMED_REQUEST,
    NOT_TASK_OWNER,
    UNKNOWN_TOOL,
    UNVERIFIED_CALLER,
    UPSTREAM_MALFORMED,
    Reason,
)
from sidecar.v1 import sidecar_pb2

if TYPE_CHECKING:
    from sidecar.escalation.grpc_api import EscalationApi
    from sidecar.invoke.executor import Executor, Performed
    from sidecar.invoke.http import HttpInvoker
    from sidecar.tasks import TaskRegistry

log = logging.getLogger(__name__)

OUTCOME_TO_PROTO = {
    "allow": sidecar_pb2.OUTCOME_ALLOW,
    "deny": sidecar_pb2.OUTCOME_DENY,
    "escalate": sidecar_pb2.OUTCOME_ESCALATE,
}
TOOLGATE_SERVICE = "sidecar.v1.ToolGate"


@dataclass(frozen=True)
class UnparseableRequest:
    """Stands in for a request message protobuf could not decode."""

    error: str


def _lenient(message_type: type) -> Any:
    def deserialize(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return UnparseableRequest(str(exc) or type(exc).__name__)

    return deserialize


def peer_info(context: grpc.aio.ServicerContext) -> PeerInfo:
    peer = context.peer() or ""
    auth_context = context.auth_context() or {}
    auth = {key: tuple(auth_context[key]) for key in PEER_AUTH_KEYS if key in auth_context}
    if peer.startswith("unix:"):
        transport = "unix"
    elif auth.get("transport_security_type") == (b"ssl",):
        transport = "tls"
    else:
        transport = "tcp"
    metadata = {}
    for key, value in context.invocation_metadata() or ():
        if not key.endswith("-bin") and isinstance(value, str):
            key = key.lower()
            # A repeated key joins with ", " as in HTTP: a second authorization token is refused, not dropped.
            metadata[key] = f"{metadata[key]}, {value}" if key in metadata else value
    return PeerInfo(transport=transport, metadata=metadata, auth_context=auth)


def struct_to_python(message: sidecar_pb2.AuthorizeRequest, field: str) -> Any:
    """The Struct field as JSON values under the numbers rule (sidecar/jsonvalues.py), None when absent.

    Numbers the rule refuses (NaN, ±Infinity, integers beyond ±(2^53−1)) are kept as they came: the
    gate denies the call naming the field, and the decision is recorded."""
    if not message.HasField(field):
        return None
    return from_struct(getattr(message, field))


def call_from_request(request: sidecar_pb2.AuthorizeRequest) -> ToolCall:
    arguments = struct_to_python(request, "arguments")
    return ToolCall(
        tool=request.tool,
        arguments=arguments if arguments is not None else {},
        call_id=request.call_id,
        task_id=request.task_id,
        intent=request.intent,
        signals=struct_to_python(request, "signals"),
        escalation_id=request.escalation_id,
        server=request.server,
    )


def verdict_to_response(verdict: Verdict) -> sidecar_pb2.AuthorizeResponse:
    # The gate refuses obligations the numbers rule would change, so they go out exactly.
    obligations = to_struct(verdict.decision.obligations, "obligations")
    return sidecar_pb2.AuthorizeResponse(
        outcome=OUTCOME_TO_PROTO[verdict.decision.outcome],
        reasons=list(verdict.decision.reasons),
        decision_id=verdict.decision_id,
        escalation_id=verdict.escalation_id,
        policy_revision=verdict.decision.policy_revision,
        trace_id=verdict.trace.trace_id,
        obligations=obligations,
        arguments_digest=verdict.arguments_digest,
    )


def invocation_to_response(verdict: Verdict, performed: "Performed | None") -> sidecar_pb2.InvokeResponse:
    response = sidecar_pb2.InvokeResponse(decision=verdict_to_response(verdict))
    if performed is None:
        return response
    result = performed.result
    response.status = result.status
    response.upstream_status = result.upstream_status or 0
    response.error = performed.record_error or result.error
    if isinstance(result.result, dict) and not performed.record_error:
        try:
            response.result.CopyFrom(to_struct(result.result, "result"))
        except NotExact as exc:  # the agent would get another value than the tool gave (and evidence hashed)
            response.error = str(Reason(
                UPSTREAM_MALFORMED, f"the tool's result cannot reach the agent exactly ({exc})"
            ))
    return response


class ToolGateServicer:
    def __init__(
        self,
        gate: Gate,
        identity: IdentityResolver,
        escalation_api: "EscalationApi | None" = None,
        *,
        executor: "Executor | None" = None,
        http_tools: "HttpInvoker | None" = None,
        tasks: "TaskRegistry | None" = None,
    ):
        self._gate = gate
        self._identity = identity
        # sidecar.escalation.grpc_api.EscalationApi: serves AwaitDecision when present.
        self._escalation_api = escalation_api
        # Invoke (docs/mcp.md#invoke-for-http-tools): the HTTP tools of invoke.tools and who carries calls out.
        self._executor = executor
        self._http_tools = http_tools
        self._tasks = tasks

    async def authorize(self, request: Any, context: grpc.aio.ServicerContext) -> sidecar_pb2.AuthorizeResponse:
        identity, parent = await self._caller(request, context)
        verdict = await self._gate.authorize(call_from_request(request), identity, parent)
        return verdict_to_response(verdict)

    async def invoke(self, request: Any, context: grpc.aio.ServicerContext) -> sidecar_pb2.InvokeResponse:
        """Authorize, and when allowed make the HTTP call from the sidecar (deny / escalate: no call)."""
        identity, parent = await self._caller(request, context)
        call = call_from_request(request.call)
        refused: str | None = None
        if self._http_tools is None or not self._http_tools.knows(call.tool):
            refused = str(Reason(
                UNKNOWN_TOOL, f"{call.tool!r} is not an HTTP tool this sidecar invokes (invoke.tools)"
            ))
        elif call.server:
            # The sidecar calls invoke.tools.<tool> itself: a server the caller names would reach policy,
            # approvals and evidence but not the call (policy deciding on a server the call never goes to).
            refused = str(Reason(
                INVALID_SERVER, f"Invoke calls the HTTP tool invoke.tools.{call.tool} itself, which has no "
                "server; leave server empty (a server the caller names is not where the call would go)"
            ))
        else:  # decided on, and sent, as the tool reads them by its input schema (defaults filled in)
            call, refused = self._http_tools.as_the_tool_reads(call)
            refused = refused or None
        verdict = await self._gate.authorize(call, identity, parent, malformed=refused)
        if verdict.decision.outcome != "allow" or self._executor is None or self._http_tools is None:
            return invocation_to_response(verdict, None)
        assert isinstance(identity, CallerIdentity)
        performed = await self._executor.perform(call, identity, verdict, self._http_tools)
        return invocation_to_response(verdict, performed)

    async def end_task(self, request: Any, context: grpc.aio.ServicerContext) -> sidecar_pb2.EndTaskResponse:
        """End a task for good, recorded as one task_end evidence record (docs/mcp.md#tasks).

        Only the task's own subject may (PERMISSION_DENIED `not_task_owner`). When the ending cannot be
        stored or recorded the task is ended all the same and the answer is UNAVAILABLE
        `task_state_unavailable` or `evidence_unavailable`; a task store that cannot be read answers
        UNAVAILABLE `task_state_unavailable` and ends nothing.
        """
        from sidecar.tasks import TaskEndUnrecorded, TaskOwnerMismatch, TaskStateUnavailable

        peer = peer_info(context)
        identity = resolve_caller(self._identity, peer)
        if isinstance(identity, IdentityError):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(Reason(UNVERIFIED_CALLER, identity.reason)))
        if isinstance(request, UnparseableRequest) or self._tasks is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, str(Reason(MALFORMED_REQUEST, "the request could not be parsed"))
            )
        task_id = request.task_id
        # Exactly the ids a call may use: any task a call opened can be ended.
        if not task_id or not usable_id(task_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(Reason(
                INVALID_TASK, f"task_id must be 1-{MAX_ID_BYTES} bytes without U+0000 (NUL), as a call's task_id"
            )))
        parent = TraceContext.from_traceparent(peer.metadata.get("traceparent"))
        try:
            ending = await self._tasks.end(task_id, identity, parent)
        except TaskOwnerMismatch as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(Reason(NOT_TASK_OWNER, str(exc))))
        except TaskEndUnrecorded as exc:
            log.error("task %r ended by %s, not kept: %s", task_id, identity.subject.spiffe_id, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.reason)
        except TaskStateUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.reason)
        receipt = ending.receipt
        return sidecar_pb2.EndTaskResponse(
            task_id=task_id,
            ended_at=ending.ended_at,
            already_ended=ending.already_ended,
            evidence_seq=receipt.seq if receipt is not None else 0,
            evidence_hash=receipt.hash if receipt is not None else "",
            trace_id=ending.trace_id,
        )

    async def _caller(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> tuple[CallerIdentity | IdentityError, TraceContext | None]:
        """The caller's identity and trace parent; a request that could not be parsed is denied,
        recorded, and aborted with INVALID_ARGUMENT (never returns then)."""
        peer = peer_info(context)
        parent = TraceContext.from_traceparent(peer.metadata.get("traceparent"))
        identity = resolve_caller(self._identity, peer)
        if isinstance(request, UnparseableRequest):
            reason = str(Reason(MALFORMED_REQUEST, f"the request could not be parsed ({request.error})"))
            verdict = await self._gate.authorize(ToolCall(tool="", arguments={}), identity, parent, malformed=reason)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{reason}; recorded as decision {verdict.decision_id}"
            )
        return identity, parent

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """ToolGate's methods by name (`Authorize`, ...), for `grpc.method_handlers_generic_handler`."""
        methods = {
            "Authorize": grpc.unary_unary_rpc_method_handler(
                self.authorize,
                request_deserializer=_lenient(sidecar_pb2.AuthorizeRequest),
                response_serializer=sidecar_pb2.AuthorizeResponse.SerializeToString,
            ),
        }
        methods["Invoke"] = grpc.unary_unary_rpc_method_handler(
            self.invoke,
            request_deserializer=_lenient(sidecar_pb2.InvokeRequest),
            response_serializer=sidecar_pb2.InvokeResponse.SerializeToString,
        )
        if self._tasks is not None:
            methods["EndTask"] = grpc.unary_unary_rpc_method_handler(
                self.end_task,
                request_deserializer=_lenient(sidecar_pb2.EndTaskRequest),
                response_serializer=sidecar_pb2.EndTaskResponse.SerializeToString,
            )
        if self._escalation_api is not None:
            methods["AwaitDecision"] = grpc.unary_unary_rpc_method_handler(
                self._escalation_api.await_decision,
                request_deserializer=_lenient(sidecar_pb2.AwaitDecisionRequest),
                response_serializer=sidecar_pb2.AwaitDecisionResponse.SerializeToString,
            )
        return methods
