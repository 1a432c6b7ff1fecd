"""An asyncio client of the Approvals API, for the CLI and the web console.

    async with ApprovalsClient("127.0.0.1:50051") as approvals:
        for e in await approvals.list(state="pending"):
            print(e["escalation_id"], e["tool"], e["subject"])
        await approvals.approve(escalation_id, note="ok for the Q3 report")

Escalations come back as plain dicts (`escalation_to_dict`: the Escalation
message's fields, times in RFC 3339, Structs as JSON values, absent ones as
None). A refusal raises ApprovalsError with the gRPC status name and the
sidecar's "<code>: <text>" message.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import grpc

from sidecar.jsonvalues import from_struct
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

STATE_NAMES = {
    sidecar_pb2.ESCALATION_STATE_PENDING: "pending",
    sidecar_pb2.ESCALATION_STATE_APPROVED: "approved",
    sidecar_pb2.ESCALATION_STATE_DENIED: "denied",
    sidecar_pb2.ESCALATION_STATE_EXPIRED: "expired",
    sidecar_pb2.ESCALATION_STATE_USED: "used",
}
STATE_VALUES = {name: value for value, name in STATE_NAMES.items()}


class ApprovalsError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(f"{message} ({status})")
        self.status = status
        self.message = message

    @property
    def code(self) -> str:
        """The sidecar's reason code (`already_decided`, ...); "" when the sidecar never answered."""
        match = re.match(r"([a-z][a-z0-9_]*): ", self.message)
        return match.group(1) if match else ""

    @property
    def unreachable(self) -> bool:
        return self.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and not self.code


def _time(message: Any, field: str) -> str:
    if not message.HasField(field):
        return ""
    moment = getattr(message, field).ToDatetime(tzinfo=timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json(message: Any, field: str) -> Any:
    return from_struct(getattr(message, field)) if message.HasField(field) else None


def escalation_to_dict(message: sidecar_pb2.Escalation) -> dict[str, Any]:
    """The Escalation message as JSON values (`approvals show --json`, the console)."""
    return {
        "escalation_id": message.escalation_id,
        "state": STATE_NAMES.get(message.state, "unknown"),
        "subject": message.subject,
        "delegation": list(message.delegation),
        "tool": message.tool,
        "server": message.server,
        "arguments_digest": message.arguments_digest,
        "arguments_preview": _json(message, "arguments_preview"),
        "arguments": _json(message, "arguments"),
        "arguments_withheld": message.arguments_withheld,
        "task_id": message.task_id,
        "intent": message.intent,
        "signals": _json(message, "signals"),
        "tool_catalog": _json(message, "tool_catalog"),
        "reasons": list(message.reasons),
        "policy_revision": message.policy_revision,
        "trace_id": message.trace_id,
        "created_at": _time(message, "created_at"),
        "expires_at": _time(message, "expires_at"),
        "approver": message.approver,
        "decided_at": _time(message, "decided_at"),
        "note": message.note,
        "subject_source": message.subject_source,
        "agent_waiting": message.agent_waiting,
        "agent_seen_at": _time(message, "agent_seen_at"),
    }


def parse_time(value: str) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def token_file_metadata(path: str) -> Callable[[], Sequence[tuple[str, str]]]:
    """Metadata presenting the JWT-SVID in `path` (re-read on every call: it rotates)."""

    def provide() -> Sequence[tuple[str, str]]:
        token = Path(path).read_text().strip()
        return (("authorization", f"Bearer {token}"),)

    return provide


class ApprovalsClient:
    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Callable[[], Sequence[tuple[str, str]]] | None = None,
        timeout: float = 10.0,
        options: Sequence[tuple[str, Any]] = (),
    ):
        self.target = target
        # An escalation read whole (Get) may be past gRPC's default 4 MiB: its arguments and signals as
        # Structs are up to ~4x the policy.max_input_bytes the sidecar received. The sidecar bounds what
        # it answers (List by grpc_api.LIST_BUDGET_BYTES, Get by one escalation).
        if not any(name == "grpc.max_receive_message_length" for name, _ in options):
            options = (("grpc.max_receive_message_length", -1), *options)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._stub = sidecar_pb2_grpc.ApprovalsStub(self._channel)
        self._metadata = metadata
        self._timeout = timeout

    def _md(self) -> Sequence[tuple[str, str]] | None:
        return tuple(self._metadata()) if self._metadata else None

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout, metadata=self._md())
        except grpc.aio.AioRpcError as exc:
            raise ApprovalsError(exc.code().name, exc.details() or exc.code().name) from None

    async def list(self, *, state: str = "", subject: str = "", tool: str = "", limit: int = 100,
                   approver: str = "") -> list[dict]:
        """Newest first. `approver`: whom the unredacted arguments are judged for (dev mode, consoles)."""
        if state and state not in STATE_VALUES:
            raise ValueError(f"state must be one of {', '.join(STATE_VALUES)}")
        request = sidecar_pb2.ListEscalationsRequest(
            state=STATE_VALUES.get(state, 0), subject=subject, tool=tool, limit=limit, approver=approver
        )
        response = await self._call(self._stub.List, request)
        return [escalation_to_dict(e) for e in response.escalations]

    async def get(self, escalation_id: str, *, approver: str = "") -> dict:
        request = sidecar_pb2.GetEscalationRequest(escalation_id=escalation_id, approver=approver)
        response = await self._call(self._stub.Get, request)
        return escalation_to_dict(response)

    async def approve(self, escalation_id: str, *, note: str = "", approver: str = "") -> dict:
        request = sidecar_pb2.DecideEscalationRequest(escalation_id=escalation_id, note=note, approver=approver)
        return escalation_to_dict(await self._call(self._stub.Approve, request))

    async def deny(self, escalation_id: str, *, note: str = "", approver: str = "") -> dict:
        request = sidecar_pb2.DecideEscalationRequest(escalation_id=escalation_id, note=note, approver=approver)
        return escalation_to_dict(await self._call(self._stub.Deny, request))

    async def watch(self, *, state: str = "") -> AsyncIterator[dict]:
        call = self._stub.Watch(sidecar_pb2.WatchEscalationsRequest(state=STATE_VALUES.get(state, 0)), metadata=self._md())
        try:
            async for message in call:
                yield escalation_to_dict(message)
        except grpc.aio.AioRpcError as exc:
            raise ApprovalsError(exc.code().name, exc.details() or exc.code().name) from None
        finally:
            call.cancel()

    async def aclose(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "ApprovalsClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
