"""The decision OPA returns, and the checks that turn a policy result into one.

A result that is not exactly `{"outcome": allow|deny|escalate, "reasons":
[string, ...], "obligations": {...}}` is malformed and becomes a deny: a
policy bug must never allow a call by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

OUTCOMES = ("allow", "deny", "escalate")


class MalformedDecision(ValueError):
    """The policy answered something that is not a decision."""


@dataclass(frozen=True)
class Decision:
    outcome: str
    reasons: tuple[str, ...]
    obligations: dict[str, Any] = field(default_factory=dict)
    policy_revision: str = ""
    engine: str = ""
    # Set when the engine failed and this deny was made in its place.
    error: str | None = None
    # The engine's own id for this decision (OPA's decision_id, for its decision logs).
    engine_decision_id: str = ""

    @classmethod
    def failed(cls, reason: str, *, engine: str, policy_revision: str = "") -> "Decision":
        """A fail-closed deny standing in for a decision the engine could not make."""
        return cls("deny", (reason,), {}, policy_revision, engine, error=reason)

    @classmethod
    def refused(cls, reasons: list[str] | tuple[str, ...], *, policy_revision: str = "") -> "Decision":
        """A deny made before policy ran (bad input, unverified caller)."""
        return cls("deny", tuple(reasons), {}, policy_revision, engine="sidecar")


def parse_decision(result: Any, *, engine: str, policy_revision: str) -> Decision:
    """Validate a raw `data.sidecar.decision` value; raise MalformedDecision if it is not one."""
    if result is None:
        raise MalformedDecision("policy returned no decision (data.sidecar.decision is undefined)")
    if not isinstance(result, dict):
        raise MalformedDecision(f"policy decision is a {type(result).__name__}, not an object")
    outcome = result.get("outcome")
    if outcome not in OUTCOMES:
        raise MalformedDecision(f"policy decision has outcome {outcome!r}, not one of {', '.join(OUTCOMES)}")
    reasons = result.get("reasons")
    if not isinstance(reasons, list) or not reasons or not all(isinstance(r, str) and r for r in reasons):
        raise MalformedDecision("policy decision reasons must be a non-empty list of non-empty strings")
    obligations = result.get("obligations", {})
    if not isinstance(obligations, dict):
        raise MalformedDecision("policy decision obligations must be an object")
    unknown = set(result) - {"outcome", "reasons", "obligations"}
    if unknown:
        raise MalformedDecision(f"policy decision has unknown keys: {', '.join(sorted(unknown))}")
    return Decision(outcome, tuple(reasons), obligations, policy_revision, engine)


class DecisionClient(Protocol):
    """All the Gate needs from OPA (sidecar/policy/opa/client.py implements it)."""

    async def decide(self, input_document: dict) -> Decision:
        """The decision for one input document; never raises: a failure is `Decision.failed(...)`."""
        ...

    def ready(self) -> tuple[bool, str]:
        """(able to decide now, detail) for the health service."""
        ...

    async def aclose(self) -> None: ...
