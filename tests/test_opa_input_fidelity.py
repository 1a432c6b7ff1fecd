"""Input fidelity at the gate: a string holding U+0000 anywhere in a call is refused with a
reason naming the field, through the served sidecar, and never reaches OPA."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.calls import ToolCall, check_call, find_nul
from sidecar.client import AsyncClient
from tests.conftest import SIMPLE_POLICY, write_policy

NUL = "\x00"


@pytest.mark.parametrize(
    "call, reason",
    [
        (ToolCall("echo" + NUL, {}), "invalid_tool: tool holds U+0000"),
        (ToolCall(NUL + "echo", {}), "invalid_tool: tool holds U+0000"),
        (ToolCall("echo", {}, server="mail" + NUL), "invalid_server: server holds U+0000"),
        (ToolCall("echo", {}, call_id="c" + NUL), "invalid_call_id: call_id holds U+0000"),
        (ToolCall("echo", {}, task_id=NUL), "invalid_task_id: task_id holds U+0000"),
        (ToolCall("echo", {}, intent="read" + NUL + "then delete"), "invalid_intent: intent holds U+0000"),
        (ToolCall("echo", {}, escalation_id="e" + NUL), "invalid_escalation_id: escalation_id holds U+0000"),
        (ToolCall("echo", {"path": "/workspace/a\x00/../../etc/shadow"}), "invalid_arguments: arguments.path holds"),
        (ToolCall("echo", {"a": [{"b": ["ok", "x" + NUL]}]}), "invalid_arguments: arguments.a[0].b[1] holds"),
        (ToolCall("echo", {"meta": {"k" + NUL: 1}}), "invalid_arguments: a key in arguments.meta holds"),
        (ToolCall("echo", {"a b": {"c": NUL}}), 'invalid_arguments: arguments["a b"].c holds'),
        (ToolCall("echo", {}, signals={"risk": [NUL]}), "invalid_signals: signals.risk[0] holds"),
        (ToolCall("echo", {}, signals={NUL: 0.1}), "invalid_signals: a key in signals holds"),
    ],
)
def test_nul_anywhere_is_refused_naming_the_field(call, reason):
    problems, _ = check_call(call, max_bytes=1 << 20, max_depth=64)
    assert any(p.startswith(reason) for p in problems), problems
    assert all(NUL not in p for p in problems)  # the reason never carries the NUL itself


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


def _without_nul(value):
    if isinstance(value, str):
        return value.replace(NUL, "")
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    if isinstance(value, dict):
        return {k.replace(NUL, ""): _without_nul(v) for k, v in value.items()}
    return value


def _plant(value, choice: int):
    """Put a NUL into the `choice`-th string (value or key) of `value`, if it has any; return (value, planted)."""
    strings = []

    def walk(node, setter):
        if isinstance(node, str):
            strings.append(setter)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, lambda new, i=i, node=node: node.__setitem__(i, new))
        elif isinstance(node, dict):
            for key in list(node):
                def rename(new, key=key, node=node):
                    node[key + new] = node.pop(key)
                strings.append(lambda new, rename=rename: rename(NUL))
                walk(node[key], lambda new, key=key, node=node: node.__setitem__(key, new))

    holder = [value]
    walk(value, lambda new: holder.__setitem__(0, new))
    if not strings:
        return holder[0], False
    strings[choice % len(strings)](NUL)
    return holder[0], True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arguments=st.dictionaries(st.text(max_size=6), json_values, max_size=5), choice=st.integers(0, 1000))
def test_a_planted_nul_is_always_found_and_a_clean_call_never_refused(arguments, choice):
    clean = _without_nul(arguments)
    assert find_nul(clean, "arguments") is None
    planted, did = _plant(json.loads(json.dumps(clean)), choice)
    if did:
        problems, _ = check_call(ToolCall("echo", planted), max_bytes=1 << 20, max_depth=64)
        assert any(p.startswith("invalid_arguments:") and "U+0000" in p for p in problems), (planted, problems)


async def test_a_nul_call_is_denied_and_recorded_by_the_served_sidecar_without_reaching_opa(
    running_sidecar, sidecar_config, tmp_path
):
    directory = write_policy(tmp_path / "policy", SIMPLE_POLICY)
    sidecar = await running_sidecar(sidecar_config(**{"policy.dir": str(directory)}))
    asked = []
    decide = sidecar.policy.decide

    async def counting(document):
        asked.append(document)
        return await decide(document)

    sidecar.gate.decisions = type("Counting", (), {"decide": staticmethod(counting)})()
    async with AsyncClient(sidecar.addresses[0]) as client:
        for arguments, signals, fragment in [
            ({"path": "/workspace/a\x00/../../etc/shadow"}, None, "arguments.path"),
            ({"k\x00": "v"}, None, "a key in arguments"),
            ({}, {"note": "x\x00"}, "signals.note"),
        ]:
            result = await client.authorize("echo", arguments, signals=signals)
            assert result.outcome == "deny" and any(fragment in r and "U+0000" in r for r in result.reasons), result
        assert (await client.authorize("echo", {"path": "/workspace/a"})).outcome == "allow"
    assert len(asked) == 1  # only the clean call reached OPA
