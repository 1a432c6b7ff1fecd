"""The gRPC face of the gate: ToolGate.Authorize over grpc.aio.

Translates protobuf to a ToolCall and the transport to a PeerInfo, asks the
identity resolver who is calling, and leaves every decision to the Gate. A
request that cannot even be parsed (e.g. non-UTF-8 strings) is still recorded
as a denied call and answered INVALID_ARGUMENT with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from sidecar.calls import ToolCall
from sidecar.evidence import TraceContext
from sidecar.gate import Gate, Verdict
from sidecar.identity import CallerIdentity, IdentityError, IdentityResolver, PeerInfo
from sidecar.jsonvalues import from_struct, to_struct
from sidecar.v1 import sidecar_pb2

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
    auth = {key: tuple(values) for key, values in (context.auth_context() or {}).items()}
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


class ToolGateServicer:
    def __init__(self, gate: Gate, identity: IdentityResolver, escalation_api: Any = None):
        self._gate = gate
        self._identity = identity
        # sidecar.escalation.grpc_api.EscalationApi: serves AwaitDecision when present.
        self._escalation_api = escalation_api

    async def authorize(self, request: Any, context: grpc.aio.ServicerContext) -> sidecar_pb2.AuthorizeResponse:
        peer = peer_info(context)
        parent = TraceContext.from_traceparent(peer.metadata.get("traceparent"))
        identity = self._resolve(peer)
        if isinstance(request, UnparseableRequest):
            reason = f"malformed_request: the request could not be parsed ({request.error})"
            verdict = await self._gate.authorize(ToolCall(tool="", arguments={}), identity, parent, malformed=reason)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{reason}; recorded as decision {verdict.decision_id}"
            )
        verdict = await self._gate.authorize(call_from_request(request), identity, parent)
        return verdict_to_response(verdict)

    def _resolve(self, peer: PeerInfo) -> CallerIdentity | IdentityError:
        try:
            return self._identity.resolve(peer)
        except IdentityError as exc:
            return exc
        except Exception as exc:  # a resolver bug must deny, not crash the call
            log.exception("identity resolver failed")
            return IdentityError(f"identity could not be verified ({type(exc).__name__})")

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "Authorize": grpc.unary_unary_rpc_method_handler(
                self.authorize,
                request_deserializer=_lenient(sidecar_pb2.AuthorizeRequest),
                response_serializer=sidecar_pb2.AuthorizeResponse.SerializeToString,
            ),
        }
        if self._escalation_api is not None:
            methods["AwaitDecision"] = grpc.unary_unary_rpc_method_handler(
                self._escalation_api.await_decision,
                request_deserializer=_lenient(sidecar_pb2.AwaitDecisionRequest),
                response_serializer=sidecar_pb2.AwaitDecisionResponse.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(TOOLGATE_SERVICE, methods)
