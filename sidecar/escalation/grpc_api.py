"""The gRPC face of escalations: ToolGate.AwaitDecision and the Approvals service.

Approvers are callers like any other: their identity comes from the same
resolver as an agent's (mTLS, JWT-SVID), through the servicer's `peer_info`,
but outside dev mode never the pod identity (the sidecar's own SPIFFE ID, on
the unix socket or in an SVID: the agent shares it, `_approvals_caller`). The request's
`approver` field is honoured only

- in dev mode (identity.sources == [dev]), where it names the approver, or
- from a caller listed in escalation.console_identities (the web console
  relaying the person its auth proxy verified), recorded as `approver_via`;
  a console relays people, never a workload (`spiffe://`) identity.

Who may then approve is the service's rule (service.approver_matches). The
same `approver` field on List and Get names whom the unredacted arguments are
judged for: they are in the answer only when that approver could decide the
pending escalation (service.view_for); otherwise `arguments_withheld` says why.
A console reads for that person only when they are among escalation.approvers
(`reader_for`), and a List answer stays under LIST_BUDGET_BYTES
(`escalations_to_list`).

A long call outlives nothing of its caller's: AwaitDecision's wait and an idle
Watch stream end when the credential that opened them expires
(`credentials_expire_at`), and the caller is verified again before an
answer or a change is sent.

Refusals are answered with a gRPC status and a message "<code>: <text>":
NOT_FOUND (unknown escalation), FAILED_PRECONDITION (expired, already
decided, already used), PERMISSION_DENIED (separation of duties, not an
approver, unverified approver), INVALID_ARGUMENT (bad note or approver),
UNAVAILABLE (the store or the evidence log is down). Each is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Collection

import grpc
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from sidecar.escalation import (
    STATES,
    Approver,
    EscalationRecord,
    EscalationRefused,
    StoreError,
)
from sidecar.escalation.approvers import MAX_APPROVER_BYTES, ReaderView, approver_matches
from sidecar.escalation.evidence import iso
from sidecar.escalation.service import EscalationService
from sidecar.evidence.records import parse_rfc3339
from sidecar.identity import CallerIdentity, IdentityError, IdentityResolver, resolve_caller
from sidecar.identity.spiffe_id import SpiffeIdError, validate_spiffe_id
from sidecar.reasons import (
    APPROVER_NOT_A_PERSON,
    APPROVER_NOT_VERIFIED,
    DELEGATED_APPROVAL,
    ESCALATION_UNAVAILABLE,
    INVALID_APPROVER,
    INVALID_TIMEOUT,
    MALFORMED_REQUEST,
    NOT_AN_APPROVER,
    NOT_YOUR_ESCALATION,
    TOO_LARGE_TO_LIST,
    UNVERIFIED_CALLER,
    Reason,
)
from sidecar.v1 import sidecar_pb2

log = logging.getLogger(__name__)

APPROVALS_SERVICE = "sidecar.v1.Approvals"
# A List answer stays under this, below the 4 MiB every gRPC client receives by default: an agent's
# big escalations must not make the list fail for every approver (escalations_to_list).
LIST_BUDGET_BYTES = 3 * 1024 * 1024

STATE_TO_PROTO = {
    "pending": sidecar_pb2.ESCALATION_STATE_PENDING,
    "approved": sidecar_pb2.ESCALATION_STATE_APPROVED,
    "denied": sidecar_pb2.ESCALATION_STATE_DENIED,
    "expired": sidecar_pb2.ESCALATION_STATE_EXPIRED,
    "used": sidecar_pb2.ESCALATION_STATE_USED,
}
PROTO_TO_STATE = {v: k for k, v in STATE_TO_PROTO.items()}
assert set(STATE_TO_PROTO) == set(STATES)


def credentials_expire_at(caller: CallerIdentity) -> float | None:
    """When the first of the caller's credentials (its own, its delegation's) expires, in Unix seconds;
    None when none expires (dev)."""
    times = [parse_rfc3339(s.svid_expires_at).timestamp()
             for s in (caller.subject, *caller.delegation) if s.svid_expires_at]
    return min(times, default=None)


def _timestamp(ts: float | None) -> Timestamp | None:
    if ts is None:
        return None
    stamp = Timestamp()
    # via datetime, so the microseconds match the RFC 3339 times in evidence records and reasons
    stamp.FromDatetime(datetime.fromtimestamp(ts, timezone.utc))
    return stamp


def _struct(value: Any) -> Struct | None:
    if not isinstance(value, dict):
        return None
    message = Struct()
    message.update(value)
    return message


def record_to_proto(record: EscalationRecord, *, now: float, view: ReaderView | None = None) -> sidecar_pb2.Escalation:
    """The escalation as the API answers it; `view` (an approver reading it) adds the unredacted arguments.

    Without a view (AwaitDecision, approve/deny answers) `arguments` stays absent."""
    message = sidecar_pb2.Escalation(
        escalation_id=record.id,
        state=STATE_TO_PROTO[record.state],
        subject=record.subject,
        delegation=list(record.delegation),
        tool=record.tool,
        server=record.server,
        arguments_digest=record.arguments_digest,
        task_id=record.task_id,
        reasons=list(record.reasons),
        policy_revision=record.policy_revision,
        trace_id=record.trace_id,
        created_at=_timestamp(record.created_at),
        expires_at=_timestamp(record.expires_at),
        approver=record.approver,
        decided_at=_timestamp(record.decided_at),
        note=record.note,
        intent=record.intent,
        subject_source=record.subject_source,
        agent_waiting=record.agent_waiting(now),
        agent_seen_at=_timestamp(record.agent_seen_at),
        arguments_withheld=view.withheld if view is not None else "",
    )
    for field, value in (("arguments_preview", record.arguments_preview), ("signals", record.signals),
                         ("tool_catalog", record.catalog), ("arguments", view.arguments if view else None)):
        struct = _struct(value)
        if struct is not None:
            getattr(message, field).CopyFrom(struct)
    return message


def escalations_to_list(messages: list[sidecar_pb2.Escalation],
                        budget: int = LIST_BUDGET_BYTES) -> list[sidecar_pb2.Escalation]:
    """The escalations of a List answer within `budget` bytes, in their order.

    One that does not fit whole is listed as its summary: no arguments, preview or signals (what the
    agent sizes), `arguments_withheld` saying `too_large_to_list` (Get reads it whole). Summaries are
    bounded by the call's limits on names, ids and intent; should even one not fit, the rest (the oldest)
    are left out and logged."""
    listed = []
    for message in messages:
        size = message.ByteSize()
        if size > budget:
            summary = sidecar_pb2.Escalation()
            summary.CopyFrom(message)
            for field in ("arguments", "arguments_preview", "signals"):
                summary.ClearField(field)
            summary.arguments_withheld = str(Reason(
                TOO_LARGE_TO_LIST,
                f"escalation {message.escalation_id} is {size} bytes with its arguments, preview and signals, "
                "more than this list has room for; read it alone (Get, `approvals show`, its console page)",
            ))
            message, size = summary, summary.ByteSize()
            if size > budget:
                log.warning("approvals: List answer full at %d escalations; %d older ones left out",
                            len(listed), len(messages) - len(listed))
                break
        budget -= size
        listed.append(message)
    return listed


def validate_approver(value: str) -> str:
    """An approver identity string: a SPIFFE ID, or `scheme:value` (e.g. email:alice@example.org).

    One identity, spelled one way: no "," (a proxy joins a repeated header's values with it, so
    `eve@evil.org,bob@example.org` is two people), and a scheme spelled `spiffe` in any case is a
    SPIFFE ID (SPIFFE://... is refused, not taken for another approver than spiffe://...)."""
    if len(value.encode("utf-8", "surrogatepass")) > MAX_APPROVER_BYTES:
        raise EscalationRefused(INVALID_APPROVER, f"the approver is over {MAX_APPROVER_BYTES} bytes", "INVALID_ARGUMENT")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise EscalationRefused(INVALID_APPROVER, "the approver holds spaces or control characters", "INVALID_ARGUMENT")
    if "," in value:
        raise EscalationRefused(INVALID_APPROVER, f"{value!r} is a list, not one identity", "INVALID_ARGUMENT")
    scheme, colon, rest = value.partition(":")
    if not colon or not scheme or not rest or not scheme.replace("-", "").replace("+", "").isalnum():
        raise EscalationRefused(
            INVALID_APPROVER,
            f"{value!r} is not an identity: use a SPIFFE ID or scheme:value (e.g. email:alice@example.org)",
            "INVALID_ARGUMENT",
        )
    if scheme.lower() == "spiffe":
        try:
            validate_spiffe_id(value)
        except SpiffeIdError as exc:
            raise EscalationRefused(INVALID_APPROVER, f"{value!r}: {exc}", "INVALID_ARGUMENT") from None
    return value


class EscalationApi:
    """Resolves who is calling and turns service answers and refusals into gRPC."""

    def __init__(self, service: EscalationService, identity: IdentityResolver, *, dev_mode: bool,
                 own_spiffe_ids: Callable[[], Collection[str]] = frozenset):
        self.service = service
        self._identity = identity
        self.dev_mode = dev_mode
        self._own_spiffe_ids = own_spiffe_ids  # the IDs of the sidecar's own SVIDs now (IdentityRuntime.own_spiffe_ids)

    # ------------------------------------------------------------- identity

    def _caller(self, context: grpc.aio.ServicerContext) -> CallerIdentity:
        from sidecar.servicer import peer_info

        caller = resolve_caller(self._identity, peer_info(context))
        if isinstance(caller, IdentityError):
            raise EscalationRefused(UNVERIFIED_CALLER, caller.reason, "UNAUTHENTICATED")
        return caller

    def _approvals_caller(self, context: grpc.aio.ServicerContext) -> CallerIdentity:
        """The verified caller of an Approvals call (deciding or reading): outside dev mode never the pod
        identity. `workload_api` gives every caller on the pod's unix socket the pod's SVID, which is the
        sidecar's own, and SPIRE registers the pod for it, so any container of the agent's pod can also fetch
        it (and any other SVID the Workload API gives the sidecar) as an X.509- or JWT-SVID and present it
        over mTLS or as a token. Whichever way it comes, it names
        the agent as much as anyone: listed as an approver or a console, it would let the agent approve its
        own calls (or relay any person) and read every escalation in full. An approver or a console presents
        a credential of an identity of its own."""
        caller = self._caller(context)
        who = caller.subject
        if not self.dev_mode and caller.delegation:  # Watch, List and Get as much as Approve and Deny
            raise EscalationRefused(
                DELEGATED_APPROVAL,
                "the Approvals service is not used through a delegation chain (no approval, nor a read of "
                "escalations, on behalf of upstream agents); call as the approver itself",
                "PERMISSION_DENIED",
            )
        if not self.dev_mode and (who.source == "workload_api" or who.spiffe_id in self._own_spiffe_ids()):
            raise EscalationRefused(
                APPROVER_NOT_VERIFIED,
                f"{who.spiffe_id} ({who.source}) is the pod identity, the sidecar's own, which every process in "
                "the agent's pod may hold, the agent included; an approver or a console presents a JWT-SVID "
                "or client certificate of an identity of its own",
                "PERMISSION_DENIED",
            )
        return caller

    def approver_for(self, context: grpc.aio.ServicerContext, claimed: str) -> Approver:
        caller = self._approvals_caller(context)
        claimed = claimed.strip() if isinstance(claimed, str) else ""
        subject = caller.subject
        if self.dev_mode:
            if claimed:
                return Approver(validate_approver(claimed), "dev")
            return Approver(subject.spiffe_id, "dev")
        if claimed and claimed != subject.spiffe_id:
            if subject.spiffe_id in self.service.console_identities:
                if claimed.lower().startswith("spiffe:"):
                    raise EscalationRefused(
                        APPROVER_NOT_A_PERSON,
                        f"a console relays the person signed in at it, not a workload ({claimed}); a workload "
                        "approves by calling with its own SPIFFE identity",
                        "PERMISSION_DENIED",
                    )
                return Approver(validate_approver(claimed), "console", via=subject.spiffe_id)
            raise EscalationRefused(
                APPROVER_NOT_VERIFIED,
                f"the approver field ({claimed}) is honoured only in dev mode or from a console listed in "
                f"escalation.console_identities; the verified caller is {subject.spiffe_id}",
                "PERMISSION_DENIED",
            )
        return Approver(subject.spiffe_id, subject.source)

    def reader(self, context: grpc.aio.ServicerContext) -> CallerIdentity:
        """The caller, if it may read escalations: any verified caller, or only approvers/consoles when
        approvers are configured."""
        caller = self._approvals_caller(context)
        who = caller.subject.spiffe_id
        if not self.dev_mode and self.service.approvers:
            if not (approver_matches(who, self.service.approvers) or who in self.service.console_identities):
                raise EscalationRefused(NOT_AN_APPROVER, f"{who} is not among escalation.approvers", "PERMISSION_DENIED")
        return caller

    def reader_for(self, context: grpc.aio.ServicerContext, claimed: str) -> Approver:
        """Who reads escalations with List or Get (`reader`), and for whom the unredacted arguments are judged.

        A console reads for the person it names (`claimed`) only when that person is among the
        approvers: a person its proxy signs in may not read escalations for that alone."""
        self.reader(context)
        reader = self.approver_for(context, claimed)
        if (not self.dev_mode and self.service.approvers and reader.via
                and not approver_matches(reader.identity, self.service.approvers)):
            raise EscalationRefused(
                NOT_AN_APPROVER,
                f"{reader.identity} (signed in at the console {reader.via}) is not among escalation.approvers, "
                "who alone may read escalations",
                "PERMISSION_DENIED",
            )
        return reader

    # ---------------------------------------------------------------- errors

    @staticmethod
    async def abort(context: grpc.aio.ServicerContext, refusal: EscalationRefused) -> None:
        status = getattr(grpc.StatusCode, refusal.status, grpc.StatusCode.FAILED_PRECONDITION)
        await context.abort(status, refusal.reason)

    @staticmethod
    async def unavailable(context: grpc.aio.ServicerContext, exc: StoreError) -> None:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, str(Reason(ESCALATION_UNAVAILABLE, f"the escalation store failed ({exc})"))
        )

    @staticmethod
    async def malformed(context: grpc.aio.ServicerContext, request: Any) -> None:
        from sidecar.servicer import UnparseableRequest

        if isinstance(request, UnparseableRequest):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                str(Reason(MALFORMED_REQUEST, f"the request could not be parsed ({request.error})")),
            )

    # ---------------------------------------------------------- AwaitDecision

    async def await_decision(self, request: Any, context: grpc.aio.ServicerContext) -> sidecar_pb2.AwaitDecisionResponse:
        await self.malformed(context, request)
        try:
            caller = self._caller(context)
            timeout = request.timeout_seconds
            if not math.isfinite(timeout) or timeout < 0:
                raise EscalationRefused(INVALID_TIMEOUT, "timeout_seconds must be a finite number >= 0", "INVALID_ARGUMENT")
            record = await self.service.get(request.escalation_id)
            self._own(caller, record)
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = min(timeout, max(0.0, remaining - 0.2))
            expires_at = credentials_expire_at(caller)
            if expires_at is not None:  # no longer than the credential verifies: then refused, below
                timeout = min(timeout, max(0.0, expires_at - self.service.clock()))
            record, timed_out = await self.service.wait(record.id, timeout)
            # the wait can outlast the credential that asked (a JWT-SVID's exp, a client certificate's
            # notAfter): the answer goes only to a caller that verifies now, as a new call would
            self._own(self._caller(context), record)
        except EscalationRefused as refusal:
            await self.abort(context, refusal)
        except StoreError as exc:
            await self.unavailable(context, exc)
        return sidecar_pb2.AwaitDecisionResponse(escalation=self._proto(record), timed_out=timed_out)

    @staticmethod
    def _own(caller: CallerIdentity, record: EscalationRecord) -> None:
        """Only the escalation's own subject may await it."""
        if record.subject != caller.subject.spiffe_id:
            raise EscalationRefused(
                NOT_YOUR_ESCALATION,
                f"escalation {record.id} belongs to another subject; only its caller may await it",
                "PERMISSION_DENIED",
            )

    # -------------------------------------------------------------- Approvals

    def _proto(self, record: EscalationRecord, reader: Approver | None = None) -> sidecar_pb2.Escalation:
        view = self.service.view_for(record, reader) if reader is not None else None
        return record_to_proto(record, now=self.service.clock(), view=view)

    async def list(self, request: Any, context: grpc.aio.ServicerContext) -> sidecar_pb2.ListEscalationsResponse:
        await self.malformed(context, request)
        try:
            reader = self.reader_for(context, request.approver)
            limit = request.limit if request.limit > 0 else 100
            records = await self.service.list(
                state=PROTO_TO_STATE.get(request.state, ""),
                subject=request.subject,
                tool=request.tool,
                limit=min(limit, 1000),
            )
        except EscalationRefused as refusal:
            await self.abort(context, refusal)
        except StoreError as exc:
            await self.unavailable(context, exc)
        return sidecar_pb2.ListEscalationsResponse(escalations=escalations_to_list([self._proto(r, reader)
                                                                                    for r in records]))

    async def get(self, request: Any, context: grpc.aio.ServicerContext) -> sidecar_pb2.Escalation:
        await self.malformed(context, request)
        try:
            reader = self.reader_for(context, request.approver)
            record = await self.service.get(request.escalation_id)
        except EscalationRefused as refusal:
            await self.abort(context, refusal)
        except StoreError as exc:
            await self.unavailable(context, exc)
        return self._proto(record, reader)

    async def approve(self, request: Any, context: grpc.aio.ServicerContext) -> sidecar_pb2.Escalation:
        return await self._decide(request, context, approve=True)

    async def deny(self, request: Any, context: grpc.aio.ServicerContext) -> sidecar_pb2.Escalation:
        return await self._decide(request, context, approve=False)

    async def _decide(self, request: Any, context: grpc.aio.ServicerContext, *, approve: bool) -> sidecar_pb2.Escalation:
        from sidecar.servicer import UnparseableRequest

        kind = "approval" if approve else "human_denial"
        if isinstance(request, UnparseableRequest):
            refusal = EscalationRefused(MALFORMED_REQUEST, f"the request could not be parsed ({request.error})",
                                        "INVALID_ARGUMENT")
            await self.service.record_refusal(kind, "", Approver("", "unknown"), refusal)
            await self.abort(context, refusal)
        try:
            try:
                approver = self.approver_for(context, request.approver)
            except EscalationRefused as refusal:
                claimed = request.approver if isinstance(request.approver, str) else ""
                await self.service.record_refusal(
                    kind, request.escalation_id, Approver(claimed[:MAX_APPROVER_BYTES], "unverified"), refusal
                )
                raise
            if approve:
                record = await self.service.approve(request.escalation_id, approver, request.note)
            else:
                record = await self.service.deny(request.escalation_id, approver, request.note)
        except EscalationRefused as refusal:
            await self.abort(context, refusal)
        except StoreError as exc:
            await self.unavailable(context, exc)
        return self._proto(record)

    async def watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[sidecar_pb2.Escalation]:
        """The escalations, then every change, each sent only to a reader `reader` admits at that moment:
        a stream outlives the credential that opened it (a JWT-SVID past its `exp`, a client certificate
        that expired on the open connection), so it ends when that credential expires, idle or not, and
        before any change the caller no longer verifies for, as a new call with it would be refused."""
        await self.malformed(context, request)
        try:
            expires_at = credentials_expire_at(self.reader(context))
            ends = None if expires_at is None else (
                asyncio.get_running_loop().time() + max(0.0, expires_at - self.service.clock()))
            # closed at once when the reader is refused (its feed subscription ends)
            async with contextlib.aclosing(self.service.watch(PROTO_TO_STATE.get(request.state, ""))) as changes:
                while True:
                    try:
                        async with asyncio.timeout_at(ends):
                            record = await anext(changes)
                    except TimeoutError:
                        self.reader(context)  # refused now, for the verifier's own reason
                        raise EscalationRefused(
                            UNVERIFIED_CALLER,
                            f"the credential that opened this stream expired at {iso(expires_at)}",
                            "UNAUTHENTICATED",
                        ) from None
                    except StopAsyncIteration:
                        return
                    self.reader(context)
                    yield self._proto(record)
        except EscalationRefused as refusal:
            await self.abort(context, refusal)
        except StoreError as exc:
            await self.unavailable(context, exc)

    def approvals_handler(self) -> grpc.GenericRpcHandler:
        from sidecar.servicer import _lenient

        def unary(method, request_type, response_type):
            return grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=_lenient(request_type), response_serializer=response_type.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            APPROVALS_SERVICE,
            {
                "List": unary(self.list, sidecar_pb2.ListEscalationsRequest, sidecar_pb2.ListEscalationsResponse),
                "Get": unary(self.get, sidecar_pb2.GetEscalationRequest, sidecar_pb2.Escalation),
                "Approve": unary(self.approve, sidecar_pb2.DecideEscalationRequest, sidecar_pb2.Escalation),
                "Deny": unary(self.deny, sidecar_pb2.DecideEscalationRequest, sidecar_pb2.Escalation),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.watch,
                    request_deserializer=_lenient(sidecar_pb2.WatchEscalationsRequest),
                    response_serializer=sidecar_pb2.Escalation.SerializeToString,
                ),
            },
        )
