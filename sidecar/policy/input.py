"""The policy input document (`"version": "sidecar/v1"`), built in one place.

Every engine sees exactly this shape; docs/policy-input.md documents it and
`input.schema.json` beside this module is its JSON Schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from sidecar.identity import CallerIdentity
from sidecar.policy.facts import argument_facts

INPUT_VERSION = "sidecar/v1"


@dataclass(frozen=True)
class Usage:
    calls_in_window: int
    window_seconds: int
    calls_in_task: int


@dataclass(frozen=True)
class Approval:
    escalation_id: str
    approver: str
    approved_at: str  # RFC 3339


def build_input(
    *,
    identity: CallerIdentity,
    tool: str,
    server: str,
    arguments: Mapping[str, Any],
    catalog_entry: Mapping[str, Any] | None,
    task_id: str,
    intent: str,
    signals: Mapping[str, Any],
    approval: Approval | None,
    usage: Usage,
    call_id: str,
    time: str,
    sidecar: str,
    phase: str = "call",
) -> dict:
    """The input document. `phase` is "call" (a tool call) or "list" (may the caller see the
    tool at all? MCP tools/list; arguments are then {} and usage zero)."""
    return {
        "version": INPUT_VERSION,
        "subject": identity.subject.to_input(),
        "delegation": [link.to_input() for link in identity.delegation],
        "tool": {
            "name": tool,
            "server": server,
            "arguments": dict(arguments),
            "catalog": dict(catalog_entry) if catalog_entry is not None else None,
            "facts": argument_facts(catalog_entry, arguments),
        },
        "task": {"id": task_id, "intent": intent},
        "signals": dict(signals),
        "approval": (
            {
                "escalation_id": approval.escalation_id,
                "approver": approval.approver,
                "approved_at": approval.approved_at,
            }
            if approval
            else None
        ),
        "usage": {
            "calls_in_window": usage.calls_in_window,
            "window_seconds": usage.window_seconds,
            "calls_in_task": usage.calls_in_task,
        },
        "request": {"call_id": call_id, "time": time, "sidecar": sidecar, "phase": phase},
    }
