"""What policy decides on, what an approver sees, what evidence records and what the tool receives: one value.

issue 11 §1. A protobuf Struct carries numbers as doubles, so 9007199254740993 would arrive as
9007199254740992.0. The numbers rule (docs/api.md, "Numbers", sidecar/jsonvalues.py): the client
refuses what would not arrive as sent, the gate refuses what it cannot know was sent, integral doubles
are integers everywhere, and the guard runs a tool only with the arguments whose digest was decided.
Variants covered: arguments and signals, top level and nested (lists, objects, odd keys), 2^53±1,
negative, floats past 2^53 (1e20), NaN, ±Infinity, -0.0, 1.0, tuples, non-string keys, sets, lone
surrogates; gRPC Authorize (client and raw Struct), the sync and async guard, `check --args`,
approvals show/list --json, AwaitDecision, obligations, evidence records.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import re
import subprocess
import sys

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.canonical import canonical_json, sha256_digest
import sidecar.calls as calls_module
from sidecar.calls import ToolCall, check_call
from sidecar.client import (
    ArgumentsChanged,
    AsyncClient,
    Client,
    NotExact,
    arguments_digest,
    build_request,
)
from sidecar.escalation.client import ApprovalsClient
from sidecar.jsonvalues import SAFE_INTEGER, from_struct, to_struct
from sidecar.console import pages
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests import test_evidence_canonical
from tests.conftest import REPO, write_policy
from tests.doubles.escalation import ALICE, make_config, records, until_pending

BIG = 9007199254740993  # 2^53 + 1: a double cannot hold it
# How long an agent's guard waits for the approver, here the test itself: it lists, runs the CLI in a
# new process and reads before it approves, which takes seconds on a loaded machine. A decision ends
# the wait at once, so this only bounds a failure.
WAIT_FOR_APPROVER = 120

ECHO_POLICY = """\
    package sidecar

    # Test policy: allow `echo`, and say exactly what policy saw (OPA keeps a number's JSON spelling: 1.0 stays 1.0).
    default obligations := {}

    obligations := data.obligations

    decision := {"outcome": "allow", "obligations": obligations,
                 "reasons": [sprintf("saw: %v %v", [input.tool.arguments, input.signals])]}
"""


@pytest.mark.parametrize(
    ("arguments", "signals", "where"),
    [
        ({"table": "orders", "ids": [BIG]}, None, "arguments.ids[0]"),
        ({"n": -BIG}, None, "arguments.n"),
        ({"n": 2**64}, None, "arguments.n"),
        ({"deep": {"x y": [{"z": 2**53}]}}, None, 'arguments.deep["x y"][0].z'),
        ({"n": 1e20}, None, "arguments.n"),
        ({"n": -1e300}, None, "arguments.n"),
        ({"n": math.nan}, None, "arguments.n"),
        ({"n": math.inf}, None, "arguments.n"),
        ({"n": [-math.inf]}, None, "arguments.n[0]"),
        ({"q": "x"}, {"risk_score": BIG}, "signals.risk_score"),
        ({"q": "x"}, {"n": math.nan}, "signals.n"),
        ({"q": "x"}, {"tokens": [1, 1e19]}, "signals.tokens[1]"),
        ({1: "a", "1": "b"}, None, "arguments"),
        ({"k": {None: 1}}, None, "arguments.k"),
        ({"s": {"a", "b"}}, None, "arguments.s"),
        ({"s": "lone \ud800 surrogate"}, None, "arguments.s"),
        ({"\udc00": 1}, None, "arguments (a key)"),
    ],
)
def test_the_client_refuses_values_that_would_not_arrive_as_sent(arguments, signals, where):
    with pytest.raises(NotExact) as refused:
        build_request("echo", arguments, signals=signals)
    assert refused.value.path == where
    assert str(refused.value).startswith(f"{where}: ")


def test_values_that_arrive_exactly_round_trip_through_struct():
    class Code(enum.IntEnum):
        OK = 7

    value = {"code": Code.OK, "max": SAFE_INTEGER, "min": -SAFE_INTEGER, "one": 1, "float_one": 1.0, "half": 0.5, "tiny": 5e-324,
             "neg_zero": -0.0, "t": (1, "a"), "nested": {"l": [True, None, "\u202e"]}, "big_float": 2.0**52 + 0.5}
    decoded = from_struct(to_struct(value, "arguments"))
    assert decoded == {**value, "t": [1, "a"]} and type(decoded["code"]) is int
    assert type(decoded["one"]) is int and type(decoded["float_one"]) is int and type(decoded["neg_zero"]) is int
    assert type(decoded["half"]) is float
    assert canonical_json(decoded) == canonical_json({**value, "t": [1, "a"]})


async def raw_authorize(address: str, request: sidecar_pb2.AuthorizeRequest) -> sidecar_pb2.AuthorizeResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        method = channel.unary_unary("/sidecar.v1.ToolGate/Authorize",
                                     request_serializer=sidecar_pb2.AuthorizeRequest.SerializeToString,
                                     response_deserializer=sidecar_pb2.AuthorizeResponse.FromString)
        return await method(request, timeout=10)


@pytest.fixture
async def echo_sidecar(tmp_path, running_sidecar, sidecar_config):
    bundle = write_policy(tmp_path / "echo", ECHO_POLICY, data="obligations:\n  max_rows: 5\n  ratio: 0.25\n")
    return await running_sidecar(sidecar_config(**{"policy.dir": str(bundle), "evidence.arguments": "clear"}))


@pytest.mark.parametrize(
    ("field", "number", "where"),
    [
        ("arguments", float(2**53), "arguments.ids[0]"),  # what 2^53 + 1 becomes in a double
        ("arguments", 1e20, "arguments.ids[0]"),
        ("arguments", -math.inf, "arguments.ids[0]"),
        ("arguments", math.nan, "arguments.ids[0]"),
        ("signals", float(-(2**60)), "signals.ids[0]"),
        ("signals", math.inf, "signals.ids[0]"),
    ],
)
async def test_the_gate_denies_struct_numbers_it_cannot_know_were_sent_and_records_them(
        echo_sidecar, tmp_path, field, number, where):
    """A caller that is not our client library (raw protobuf) sends what Struct allows."""
    request = sidecar_pb2.AuthorizeRequest(tool="echo", arguments=to_struct({"q": "x"}, "arguments"))
    getattr(request, field).update({"ids": [number]})
    response = await raw_authorize(echo_sidecar.addresses[0], request)
    assert response.outcome == sidecar_pb2.OUTCOME_DENY
    assert response.reasons[0].startswith(f"invalid_{field}: {where}: "), response.reasons
    recorded = [r for r in records(tmp_path / "evidence") if r.get("decision_id") == response.decision_id]
    assert len(recorded) == 1 and recorded[0]["outcome"] == "deny"


async def test_integral_doubles_are_integers_for_policy_evidence_and_obligations(echo_sidecar, tmp_path):
    arguments = {"n": 1.0, "ids": [SAFE_INTEGER, -SAFE_INTEGER, -0.0], "half": 0.5, "t": (2, 3)}
    async with AsyncClient(echo_sidecar.addresses[0]) as client:
        result = await client.authorize("echo", arguments, signals={"risk_score": 3.0, "p": 0.125})
    exact = {"n": 1, "ids": [SAFE_INTEGER, -SAFE_INTEGER, 0], "half": 0.5, "t": [2, 3]}
    assert result.outcome == "allow", result.reasons
    assert result.reasons == (f"saw: {json.dumps(exact, sort_keys=True)} " '{"p": 0.125, "risk_score": 3}',)
    assert result.obligations == {"max_rows": 5, "ratio": 0.25} and type(result.obligations["max_rows"]) is int
    assert result.arguments_digest == arguments_digest(arguments) == sha256_digest(canonical_json(exact))
    [record] = [r for r in records(tmp_path / "evidence") if r.get("decision_id") == result.decision_id]
    assert record["arguments_digest"] == result.arguments_digest


async def test_obligations_policy_cannot_send_exactly_are_a_deny(tmp_path, running_sidecar, sidecar_config):
    bundle = write_policy(tmp_path / "echo", ECHO_POLICY, data=f"obligations:\n  max_rows: {BIG}\n")
    sidecar = await running_sidecar(sidecar_config(**{"policy.dir": str(bundle)}))
    async with AsyncClient(sidecar.addresses[0]) as client:
        result = await client.authorize("echo", {"q": "x"})
    assert result.outcome == "deny" and result.obligations == {}
    assert result.reasons[0].startswith(f"policy_malformed: obligations.max_rows: {BIG} is beyond")


def test_check_cli_applies_the_numbers_rule_to_args(tmp_path):
    bundle = write_policy(tmp_path / "echo", ECHO_POLICY)

    def check(args: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "sidecar", "check", "--policy", str(bundle), "--subject", "spiffe://dev.local/agent",
             "--tool", "echo", "--args", args], cwd=REPO, capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)

    refused = check('{"table": "orders", "ids": [9007199254740993]}')
    assert refused["outcome"] == "deny"
    assert refused["reasons"][0].startswith("invalid_arguments: arguments.ids[0]: 9007199254740993 is beyond")
    assert check('{"n": 1e400}')["reasons"][0].startswith("invalid_arguments: arguments.n: inf is not a JSON number")
    assert check('{"n": 1.0, "m": [2.50]}')["reasons"] == ['saw: {"m": [2.5], "n": 1} {}']


SEVEN_AS_FLOAT = re.compile(r"(?<![\d.])7\.0(?!\d)")


async def test_issue_example_is_refused_and_a_safe_integer_is_shown_approved_and_run_exactly(
        tmp_path, running_sidecar):
    """`delete_records` with ids [2^53+1]: refused by the client before anything escalates. With
    ids [2^53-1] the approver sees 9007199254740991 (not ...992.0), and the tool runs with it."""
    sidecar = await running_sidecar(make_config(tmp_path))
    address = sidecar.addresses[0]
    ran: list = []

    def agent(ids: list) -> None:
        with Client(address, escalation_timeout=WAIT_FOR_APPROVER) as client:

            @client.guard(tool="send_email")
            def delete_records(table: str, ids: list) -> None:
                ran.append(ids)

            delete_records("orders", ids)

    with pytest.raises(NotExact, match=r"arguments.ids\[0\]: 9007199254740993 is beyond"):
        await asyncio.to_thread(agent, [BIG])

    async with ApprovalsClient(address) as approvals:
        assert await approvals.list(state="") == []  # nothing escalated, nothing to approve
        running = asyncio.create_task(asyncio.to_thread(agent, [SAFE_INTEGER, 7]))
        [escalation] = await until_pending(approvals, running)
        assert escalation["arguments_preview"] == {"table": "orders", "ids": [SAFE_INTEGER, 7]}
        assert all(type(i) is int for i in escalation["arguments_preview"]["ids"])
        shown = await cli("approvals", "show", escalation["escalation_id"], "--address", address)
        # `7.0` on its own, not inside a time such as 13:27:07.012345Z
        assert "9007199254740991," in shown and "9007199254740991.0" not in shown and not SEVEN_AS_FLOAT.search(shown)
        page = pages.detail_page(escalation, approver=ALICE, jaeger_url="", csrf_token="t")  # what the console renders
        assert "9007199254740991," in page and "9007199254740991.0" not in page and not SEVEN_AS_FLOAT.search(page)
        async with grpc.aio.insecure_channel(address) as channel:  # AwaitDecision carries the same preview
            waited = await sidecar_pb2_grpc.ToolGateStub(channel).AwaitDecision(
                sidecar_pb2.AwaitDecisionRequest(escalation_id=escalation["escalation_id"], timeout_seconds=0))
        awaited = from_struct(waited.escalation.arguments_preview)
        assert awaited == {"table": "orders", "ids": [SAFE_INTEGER, 7]} and all(type(i) is int for i in awaited["ids"])
        await approvals.approve(escalation["escalation_id"], approver=ALICE)
        await running
    assert ran == [[SAFE_INTEGER, 7]]
    digest = arguments_digest({"table": "orders", "ids": [SAFE_INTEGER, 7]})
    decided = [r for r in records(tmp_path / "evidence") if r.get("kind") == "decision"]
    assert [r["outcome"] for r in decided] == ["escalate", "allow"]
    assert {r["arguments_digest"] for r in decided} == {digest}


async def cli(*args: str) -> str:
    """The CLI as a person runs it; async, so the sidecar in this event loop can answer."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "sidecar", *args, cwd=REPO,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_the_guard_runs_the_values_decided_even_if_the_caller_changes_them_meanwhile(
        tmp_path, running_sidecar):
    sidecar = await running_sidecar(make_config(tmp_path))
    address = sidecar.addresses[0]
    recipients, body = ["ops@example.com"], {"text": "hi"}
    ran: list = []

    def agent() -> None:
        with Client(address, escalation_timeout=WAIT_FOR_APPROVER) as client:
            client.guard(tool="send_email")(lambda to, body: ran.append((to, body)))(recipients, body=body)

    async with ApprovalsClient(address) as approvals:
        running = asyncio.create_task(asyncio.to_thread(agent))
        pending = await until_pending(approvals, running)
        recipients.append("attacker@evil.example")  # while the human reads the preview
        body["text"] = "wire the money"
        [escalation] = pending
        assert escalation["arguments_preview"] == {"to": ["ops@example.com"], "body": {"text": "hi"}}
        await approvals.approve(escalation["escalation_id"], approver=ALICE)
        await running
    assert ran == [(["ops@example.com"], {"text": "hi"})]


class _LyingToolGate:
    """TEST DOUBLE for a case the real sidecar cannot produce: it allows, with another arguments digest
    (a sidecar or proxy that changed the arguments on the way)."""

    async def authorize(self, request, context):
        return sidecar_pb2.AuthorizeResponse(outcome=sidecar_pb2.OUTCOME_ALLOW, reasons=["ok: lying"],
                                             decision_id="d-1", arguments_digest="sha256:" + "0" * 64)


async def test_the_guard_refuses_to_run_when_the_decided_arguments_are_not_the_ones_it_runs_with():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("sidecar.v1.ToolGate", {
        "Authorize": grpc.unary_unary_rpc_method_handler(
            _LyingToolGate().authorize, request_deserializer=sidecar_pb2.AuthorizeRequest.FromString,
            response_serializer=sidecar_pb2.AuthorizeResponse.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ran = []
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:

            @client.guard()
            async def read_file(path: str) -> None:
                ran.append(path)

            with pytest.raises(ArgumentsChanged, match="sha256:0000"):
                await read_file("/workspace/a")

        def sync() -> None:
            with Client(f"127.0.0.1:{port}") as client:
                with pytest.raises(ArgumentsChanged):
                    client.guard()(lambda path: ran.append(path))("/workspace/b")

        await asyncio.to_thread(sync)
    finally:
        await server.stop(0)
    assert ran == []


async def test_a_sync_guard_with_a_number_the_sidecar_could_not_carry_never_calls(echo_sidecar):
    ran = []

    def use() -> None:
        with Client(echo_sidecar.addresses[0]) as client:
            echo = client.guard()(lambda limit: ran.append(limit))
            echo(3.0)
            with pytest.raises(NotExact, match="arguments.limit"):
                echo(float("nan"))
            with pytest.raises(NotExact, match="signals.score"):
                client.guard(tool="echo", signals={"score": 2**70})(lambda: ran.append("x"))()

    await asyncio.to_thread(use)
    assert ran == [3.0]


def test_normalizing_input_nested_past_the_recursion_limit_does_not_crash():
    """Doors other than gRPC (check --args, MCP) hand the gate parsed JSON of any depth; the gate refuses
    it as too deep afterwards, so normalizing must not raise first."""
    from sidecar.calls import ToolCall, check_call, normalized

    deep: list = [1.0]
    for _ in range(5000):
        deep = [deep]
    call = normalized(ToolCall("echo", {"deep": deep}))
    problems, _digest = check_call(call, max_bytes=1 << 20, max_depth=64)
    assert problems[0].startswith("input_too_deep: arguments nest deeper")


# check_call's one-walk path (canonical.plain_form) must judge every value as the naming walks do.
NUL_TEXT = st.sampled_from(["\x00", "a\x00", "\\u0000", "\\\\u0000", "\\\x00", "u0000", "\\"])
checked_values = st.recursive(
    st.one_of(test_evidence_canonical.scalars, test_evidence_canonical.any_magnitude, NUL_TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(test_evidence_canonical.awkward_text, NUL_TEXT), inner, max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(arguments=st.one_of(checked_values, st.dictionaries(st.text(max_size=5), checked_values, max_size=4)),
       signals=st.one_of(st.none(), checked_values), max_depth=st.integers(min_value=1, max_value=6))
def test_the_one_walk_check_judges_every_value_as_the_naming_walks_do(arguments, signals, max_depth, monkeypatch):
    """Same problems (NUL, depth, numbers, size, shape) in the same order, and the same digest."""
    call = ToolCall(tool="t", arguments=arguments, signals=signals)
    fast = check_call(call, max_bytes=300, max_depth=max_depth)
    with monkeypatch.context() as patched:
        patched.setattr(calls_module, "_clean_form", lambda value, depth: None)
        slow = check_call(call, max_bytes=300, max_depth=max_depth)
    assert fast == slow


def test_the_one_walk_check_still_names_nul_depth_and_numbers():
    """The cases the fast path hands to the naming walks, each named as before."""
    for arguments, reason in (
        ({"a": ["x", {"k\x00": 1}]}, 'invalid_arguments: a key in arguments.a[1] holds U+0000'),
        ({"a": "\\u0000\x00"}, "invalid_arguments: arguments.a holds U+0000"),
        ({"a": [[[[1]]]]}, "input_too_deep: arguments nest deeper than the limit of 3 levels"),
        ({"n": 2**53}, "invalid_arguments: arguments.n: 9007199254740992 is beyond"),
        ({"n": float("nan")}, "invalid_arguments: arguments.n: nan is not a JSON number"),
    ):
        problems, _ = check_call(ToolCall(tool="t", arguments=arguments), max_bytes=1 << 20, max_depth=3)
        assert problems and problems[0].startswith(reason), (arguments, problems)
    clean, digest = check_call(ToolCall(tool="t", arguments={"a": "\\u0000", "b": [0.5, 1e-5]}), max_bytes=1 << 20,
                               max_depth=3)
    assert clean == [] and digest == sha256_digest(canonical_json({"a": "\\u0000", "b": [0.5, 1e-5]}))
