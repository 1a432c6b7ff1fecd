"""The sidecar's spans in the real Jaeger: found through Jaeger's query API the ways docs/evidence.md says.

The sidecar (shipped rego/, dev identity) exports over OTLP/gRPC (and
OTLP/HTTP) to a real Jaeger v2 (tests/infra/jaeger.py, memory storage). Each
test uses its own service name, so the tests can share one Jaeger.
"""

from __future__ import annotations

import json
import uuid

import pytest

from sidecar.client import AsyncClient
from tests.conftest import write_policy
from tests.doubles.escalation import records as read_records
from tests.infra.jaeger import Jaeger, Span, clean_otel_env, wait_until_async  # noqa: F401 (fixture)

AGENT = "spiffe://dev.local/agent"
ALLOWED = ("read_file", {"path": "/workspace/notes.txt"})
DENIED = ("read_file", {"path": "/etc/shadow"})
OTHER_TOOL = ("write_file", {"path": "/workspace/out.txt", "content": "x"})


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory):
    with Jaeger(tmp_path_factory.mktemp("jaeger")) as running:
        yield running


@pytest.fixture
def service() -> str:
    return f"sidecar-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def traced_sidecar(tmp_path, running_sidecar, sidecar_config, jaeger, service, clean_otel_env):
    config = sidecar_config(**jaeger.telemetry_settings(service), **{"evidence.dir": str(tmp_path / "ev")})
    return await running_sidecar(config)


def complete(spans: list[Span], count: int) -> list[Span]:
    """`spans` once there are `count` of them, else [] (keep waiting)."""
    return spans if len(spans) >= count else []


def by_name(spans: list[Span]) -> dict[str, Span]:
    return {span.name: span for span in spans}


async def test_a_decision_is_found_by_its_trace_id_with_its_attributes(traced_sidecar, jaeger, service, tmp_path):
    async with AsyncClient(traced_sidecar.addresses[0]) as agent:
        call_id = str(uuid.uuid4())
        result = await agent.authorize(*ALLOWED, call_id=call_id, task_id="task-7")
    assert result.outcome == "allow"

    spans = await wait_until_async(lambda: complete(jaeger.trace(result.trace_id), 2))
    assert spans, f"trace {result.trace_id} not in Jaeger ({jaeger.trace_url(result.trace_id)})"
    named = by_name(spans)
    assert set(named) == {"execute_tool read_file", "run_guardrail policy"}
    tool, guard = named["execute_tool read_file"], named["run_guardrail policy"]
    (record,) = [r for r in read_records(tmp_path / "ev") if r.get("decision_id") == result.decision_id]

    assert tool.trace_id == result.trace_id == record["trace_id"]
    assert tool.span_id == record["span_id"] and tool.parent_span_id == ""
    assert tool.service == service and tool.process["service.instance.id"] == "test-sidecar"
    t = tool.tags
    assert t["gen_ai.operation.name"] == "execute_tool"
    assert t["gen_ai.tool.name"] == "read_file" and t["gen_ai.tool.call.id"] == call_id
    assert t["spiffe.id"] == AGENT and t["sidecar.subject.source"] == "dev"
    assert t["sidecar.decision.id"] == result.decision_id and t["sidecar.decision.outcome"] == "allow"
    assert t["sidecar.policy.revision"] == result.policy_revision and t["sidecar.task.id"] == "task-7"
    assert t["sidecar.evidence.seq"] == record["seq"] and t["sidecar.evidence.hash"] == record["hash"]
    # an array attribute reaches Jaeger's API as a JSON string (docs/evidence.md says so)
    assert json.loads(t["sidecar.decision.reason_codes"]) == sorted({r.split(": ")[0] for r in result.reasons})
    assert [log["sidecar.reason.text"] for log in tool.logs] == list(result.reasons)
    assert all(log["event"] == "sidecar.decision.reason" for log in tool.logs)
    assert "error" not in t, "an allow is not an error"

    assert guard.parent_span_id == tool.span_id and guard.trace_id == tool.trace_id
    g = guard.tags
    assert g["gen_ai.guardrail.verdict.type"] == "allow" and g["gen_ai.guardrail.action.type"] == "allow"
    assert g["gen_ai.guardrail.target.subtype"] == "tool_call" and g["gen_ai.guardrail.target.id"] == call_id
    assert g["gen_ai.guardrail.security.content.input.hash"] == record["arguments_digest"]


async def test_decisions_are_found_by_tool_name_and_the_documented_tags(traced_sidecar, jaeger, service):
    async with AsyncClient(traced_sidecar.addresses[0]) as agent:
        allowed = await agent.authorize(*ALLOWED)
        denied = await agent.authorize(*DENIED)
        other = await agent.authorize(*OTHER_TOOL)
    assert (allowed.outcome, denied.outcome) == ("allow", "deny")
    every = {allowed.trace_id, denied.trace_id, other.trace_id}
    assert await wait_until_async(lambda: every <= set(jaeger.find(service)))

    def found(**search) -> set[str]:
        return set(jaeger.find(service, **search))

    # by gen_ai.tool.name: both read_file calls, not the write_file one
    assert found(tags={"gen_ai.tool.name": "read_file"}) == {allowed.trace_id, denied.trace_id}
    assert found(tags={"gen_ai.tool.name": "write_file"}) == {other.trace_id}
    # the rows of docs/evidence.md "What to search by in Jaeger"
    assert found(tags={"sidecar.decision.id": denied.decision_id}) == {denied.trace_id}
    assert found(tags={"spiffe.id": AGENT}) == every
    deny_codes = {r.split(": ")[0] for r in denied.reasons}
    assert found(tags={"sidecar.decision.outcome": "deny"}) >= {denied.trace_id}
    assert allowed.trace_id not in found(tags={"sidecar.decision.outcome": "deny"})
    assert found(tags={"gen_ai.guardrail.verdict.type": "deny"}) == found(tags={"sidecar.decision.outcome": "deny"})
    for code in deny_codes:  # a field of the reason events
        assert denied.trace_id in found(tags={"sidecar.reason.code": code})
        assert allowed.trace_id not in found(tags={"sidecar.reason.code": code})
    assert found(operation="execute_tool read_file") == {allowed.trace_id, denied.trace_id}
    assert "execute_tool read_file" in jaeger.operations(service)
    assert found(tags={"gen_ai.tool.name": "no_such_tool"}) == set()


async def test_checkpoints_reach_jaeger_as_their_own_traces(tmp_path, running_sidecar, sidecar_config, jaeger, service,
                                                            clean_otel_env):
    config = sidecar_config(**jaeger.telemetry_settings(service), **{
        "evidence.dir": str(tmp_path / "ev"), "evidence.checkpoint_every": 2})
    sidecar = await running_sidecar(config)
    async with AsyncClient(sidecar.addresses[0]) as agent:
        for _ in range(2):
            await agent.authorize(*ALLOWED)
    checkpoints = [r for r in read_records(tmp_path / "ev") if r["kind"] == "checkpoint"]
    assert checkpoints
    traces = await wait_until_async(lambda: jaeger.find(service, operation="evidence.checkpoint"))
    spans = [s for spans in traces.values() for s in spans]
    heads = {s.tags["sidecar.evidence.checkpoint.head_hash"] for s in spans}
    assert {c["checkpoint"]["head_hash"] for c in checkpoints} <= heads
    assert all(s.tags["sidecar.evidence.checkpoint.signature"] for s in spans)


async def test_otlp_over_http_protobuf_reaches_jaeger(tmp_path, running_sidecar, sidecar_config, jaeger, service,
                                                      clean_otel_env):
    config = sidecar_config(**jaeger.telemetry_settings(service, protocol="http/protobuf"),
                            **{"evidence.dir": str(tmp_path / "ev")})
    sidecar = await running_sidecar(config)
    async with AsyncClient(sidecar.addresses[0]) as agent:
        result = await agent.authorize(*ALLOWED)
    spans = await wait_until_async(lambda: jaeger.trace(result.trace_id))
    assert {s.name for s in spans} >= {"execute_tool read_file"}
    assert by_name(spans)["execute_tool read_file"].tags["sidecar.decision.id"] == result.decision_id


CONFLICTING_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok: listed"], "obligations": {}} if input.tool.name == "echo"

    decision := {"outcome": "allow", "reasons": ["ok: listed twice"], "obligations": {}} if input.tool.name == "echo"
"""


@pytest.mark.parametrize("storage", ["memory", "badger"])
async def test_a_policy_failure_is_an_error_span_found_by_its_error_type(tmp_path, running_sidecar, sidecar_config,
                                                                       service, storage, clean_otel_env):
    with Jaeger(tmp_path / "jaeger", storage=storage) as jaeger:
        config = sidecar_config(**jaeger.telemetry_settings(service), **{
            "policy.dir": str(write_policy(tmp_path / "policy", CONFLICTING_POLICY)),  # conflicts when evaluated
            "evidence.dir": str(tmp_path / "ev"),
        })
        sidecar = await running_sidecar(config)
        async with AsyncClient(sidecar.addresses[0]) as agent:
            failed = await agent.authorize("echo", {})
            plain_deny = await agent.authorize("other", {})
        assert failed.outcome == "deny" and failed.reasons[0].startswith("policy_error:")
        assert plain_deny.outcome == "deny" and not plain_deny.reasons[0].startswith("policy_error:")
        every = {failed.trace_id, plain_deny.trace_id}
        assert await wait_until_async(lambda: every <= set(jaeger.find(service)))

        tool = by_name(jaeger.trace(failed.trace_id))["execute_tool"]
        assert tool.tags["error"] is True and tool.tags["otel.status_code"] == "ERROR"
        assert tool.tags["error.type"] == "policy_engine_error" and tool.tags["otel.status_description"]
        assert "error" not in by_name(jaeger.trace(plain_deny.trace_id))["execute_tool"].tags, "a deny is not an error"
        assert set(jaeger.find(service, tags={"error.type": "policy_engine_error"})) == {failed.trace_id}
        # Jaeger v2.13's memory storage compares the search's "error" (a string from the query API)
        # as a boolean and finds nothing; badger indexes the tag as text. docs/evidence.md says so.
        by_error_tag = set(jaeger.find(service, tags={"error": "true"}))
        assert by_error_tag == ({failed.trace_id} if storage == "badger" else set())
