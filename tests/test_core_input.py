"""The policy input document: real inputs from the real pipeline checked against the JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

import sidecar.policy.input as input_module
from sidecar.calls import CallIdRegistry, ToolCall
from sidecar.gate import Gate
from sidecar.identity import CallerIdentity, Subject
from sidecar.policy.opa.service import PolicyService
from sidecar.server import default_steps
from sidecar.steps import AskPolicy
from sidecar.usage.memory import MemoryCounter
from tests.conftest import REGO

SCHEMA = json.loads((Path(input_module.__file__).parent / "input.schema.json").read_text())


class InputCapturingClient:
    """Delegates to the real managed OPA and keeps every input it was given."""

    def __init__(self, policy):
        self._policy = policy
        self.inputs: list[dict] = []

    async def decide(self, document):
        self.inputs.append(document)
        return await self._policy.decide(document)

    def ready(self):
        return self._policy.ready()

    async def aclose(self):
        pass


async def test_inputs_built_by_the_gate_match_the_schema():
    policy = PolicyService(REGO, reload=False)
    await policy.start()
    capturing = InputCapturingClient(policy)
    ask = AskPolicy(decisions=capturing, catalog=policy.catalog, usage=MemoryCounter(60, 100), instance_id="schema-test")
    steps = default_steps(policy=ask, call_ids=CallIdRegistry(100), max_input_bytes=1 << 20, max_depth=64)
    gate = Gate(steps=steps, policy=ask, recorder=None, instance_id="schema-test")
    caller = Subject("spiffe://example.org/ns/agents/sa/research", source="mtls", svid_expires_at="2026-11-22T12:00:00Z")
    upstream = Subject("spiffe://example.org/ns/agents/sa/planner", source="jwt_svid", svid_expires_at=None)
    try:
        for call, identity in [
            (ToolCall("read_file", {"path": "/workspace/a"}), CallerIdentity(caller)),
            (
                ToolCall("send_email", {"to": ["x@example.org"], "subject": "s", "body": "b"}, task_id="t-1", intent="report", signals={"risk_score": 0.9}, server="mail"),
                CallerIdentity(caller, (upstream,)),
            ),
            (ToolCall("not_in_catalog", {}), CallerIdentity(Subject("spiffe://dev.local/agent", source="dev"))),
        ]:
            await gate.authorize(call, identity)
    finally:
        await policy.aclose()

    assert len(capturing.inputs) == 3
    for document in capturing.inputs:
        jsonschema.validate(document, SCHEMA, format_checker=jsonschema.FormatChecker())
    first, second, third = capturing.inputs
    assert first["tool"]["catalog"]["risk"] == "low"
    assert third["tool"]["catalog"] is None
    assert second["delegation"][0]["spiffe_id"].endswith("/planner")
    assert second["usage"] == {"calls_in_window": 1, "window_seconds": 60, "calls_in_task": 1}
    assert len({d["request"]["call_id"] for d in capturing.inputs}) == 3


def test_the_schema_rejects_a_document_missing_a_field():
    document = {"version": "sidecar/v1"}
    try:
        jsonschema.validate(document, SCHEMA)
    except jsonschema.ValidationError as exc:
        assert "required" in exc.message
    else:
        raise AssertionError("schema accepted an incomplete document")
