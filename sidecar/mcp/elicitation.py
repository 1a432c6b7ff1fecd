"""MCP elicitation for escalated calls: ask the agent's user whether to wait for the approver.

When policy escalates a `tools/call` and the client declared the `elicitation`
capability (form mode), the gateway asks the client, in a form with no fields,
whether to wait for a human approver's decision; the message names the call
(tool, upstream, escalation id, reasons, the redacted argument preview and the
arguments' sha256), escaped with `sidecar.display` like every other surface.

**The answer is not an approval.** The agent's own client can answer it, so
`accept` only means "wait in this call"; whatever content comes with it is
ignored. Only an approver decides (Approvals API, CLI, console), and the call
then runs only through the Gate's approved-retry path (the approval used once).

Two ways to ask, by protocol revision:

- handshake revisions (the `initialize` handshake, 2024-11-05 … 2025-11-25; MCP spec
  2025-06-18 "Elicitation"): an `elicitation/create` request sent on the open
  tools/call's own stream (`ask`);
- 2026-07-28 (a per-request envelope; the server cannot send requests of its own):
  the tools/call answers `InputRequiredResult` holding the same question under
  `WAIT_KEY` (`input_required`); the client asks its user and repeats the call
  with the answer in `input_responses` (`reply`).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Protocol

import mcp_types as types
from mcp.server.session import ServerSession
from mcp.shared.message import ServerMessageMetadata
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from sidecar.display import FLAG, NOTICE, cell, json_text, value_needs_flag
from sidecar.escalation import EscalationRecord, EscalationRefused, StoreError

log = logging.getLogger(__name__)

WAIT_KEY = "sidecar/await_approval"  # the key of the question in InputRequiredResult.input_requests
# Nothing to fill in: the form is a yes/no question (accept = wait, decline/cancel = don't).
REQUESTED_SCHEMA: types.ElicitRequestedSchema = {"type": "object", "properties": {}}

ACCEPT = "accept"
NOT_ASKED = ""  # no answer: the client was not asked, or could not answer (error, timeout)


class Escalations(Protocol):
    """What the gateway needs from the escalation service (sidecar.escalation.service.EscalationService),
    the same calls `ToolGate.AwaitDecision` makes."""

    async def get(self, escalation_id: str) -> EscalationRecord:
        """The escalation; raises EscalationRefused (unknown id) or StoreError."""
        ...

    async def wait(self, escalation_id: str, timeout: float) -> tuple[EscalationRecord, bool]:
        """Until it leaves `pending` or `timeout` seconds (capped by the service) pass: (record, timed_out)."""
        ...


def supports_form(capabilities: types.ClientCapabilities | None) -> bool:
    """Whether the client can answer a form elicitation: `elicitation: {}` (before modes existed) or `form`."""
    elicitation = capabilities.elicitation if capabilities is not None else None
    return elicitation is not None and (elicitation.form is not None or elicitation.url is None)


def in_band(protocol_version: str) -> bool:
    """True when the question goes back in the result (`InputRequiredResult`, 2026-07-28), not as a request."""
    return protocol_version in MODERN_PROTOCOL_VERSIONS


def question(record: EscalationRecord, exposed_name: str, wait_seconds: float) -> str:
    """The elicitation message: which call waits for whom, escaped for people (sidecar.display)."""
    reasons = "; ".join(cell(r) for r in record.reasons) or "(none given)"
    expires = datetime.fromtimestamp(record.expires_at, timezone.utc).isoformat(timespec="seconds")
    lines = [
        f"The tool call {cell(exposed_name)} (tool {cell(record.tool)} on upstream {cell(record.server)}) needs a "
        f"human approver's decision: escalation {cell(record.id)}, open until {expires}.",
        f"Reasons: {reasons}",
        f"Arguments sha256: {cell(record.arguments_digest)}",
    ]
    if record.arguments_preview is not None:
        lines.append(f"Arguments (secrets redacted): {json_text(record.arguments_preview, indent=None)}")
        if value_needs_flag(record.arguments_preview):
            lines.append(f"{FLAG} the arguments {NOTICE}")
    lines.append(
        f"Accept to wait here up to {wait_seconds:g} s for the approver's decision; decline to get the "
        "escalation id and wait elsewhere. Accepting does not approve the call: only an approver can "
        "(agent-sidecar approvals, the console)."
    )
    return "\n".join(lines)


def _request(message: str) -> types.ElicitRequest:
    return types.ElicitRequest(params=types.ElicitRequestFormParams(message=message, requested_schema=REQUESTED_SCHEMA))


def input_required(message: str) -> types.InputRequiredResult:
    """The 2026-07-28 answer that asks the question: the client repeats the call with its user's answer."""
    return types.InputRequiredResult(input_requests={WAIT_KEY: _request(message)})


def reply(params: types.CallToolRequestParams) -> str | None:
    """The client's answer carried by a repeated call (2026-07-28): its action, "" for a response that is not
    an elicitation result, None when the call carries no answer to the question."""
    responses = params.input_responses or {}
    if WAIT_KEY not in responses:
        return None
    response = responses[WAIT_KEY]
    return response.action if isinstance(response, types.ElicitResult) else NOT_ASKED


async def ask(session: ServerSession, request_id: types.RequestId | None, message: str, timeout: float) -> str:
    """Send `elicitation/create` on the call's stream (handshake revisions): the action, or NOT_ASKED when the
    client answered with an error, an invalid result or not within `timeout` seconds."""
    try:
        result = await session.send_request(
            _request(message),
            types.ElicitResult,
            request_read_timeout_seconds=timeout,
            metadata=ServerMessageMetadata(related_request_id=request_id),
        )
    except Exception as exc:  # a client error or timeout: the call gets the escalation answer instead
        log.info("MCP elicitation not answered: %s", exc)
        return NOT_ASKED
    return result.action


async def wait_for_decision(escalations: Escalations, escalation_id: str, seconds: float) -> EscalationRecord | None:
    """The escalation once it left `pending`, or None when it is still pending after `seconds` (or cannot be read).

    Waits through the service's own wait (each capped by `escalation.await_max_seconds`) until `seconds` pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, seconds)
    try:
        while True:
            record, timed_out = await escalations.wait(escalation_id, max(0.0, deadline - loop.time()))
            if not timed_out:
                return record
            if loop.time() >= deadline:
                return None
    except (EscalationRefused, StoreError) as exc:
        log.warning("escalation %s: could not wait for its decision: %s", escalation_id, exc)
        return None
