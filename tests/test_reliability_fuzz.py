"""Bad input fuzzing: generated requests, raw bytes and metadata against a real sidecar process.

Every answer must be a decision with reasons (or INVALID_ARGUMENT for bytes
that are not a message), the process must stay up, and every call must be in
the evidence log. Generators for issue 11: numbers a Struct would change (§1) arrive
exactly or are denied naming the field; text that hides itself (§6) reads
escaped in `evidence show`. `make test` runs FUZZ_EXAMPLES=1500 per property (7,500
calls over the five `@FUZZ` properties); `make reliability` runs 3,400 per property.
"""

from __future__ import annotations

import io
import json
import math
import os
import time

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from google.protobuf import json_format
from hypothesis import strategies as st

from sidecar.client import NotExact, arguments_digest, build_request
from sidecar.display import hidden, needs_flag
from sidecar.evidence.show import Filter, iter_lines, show
from sidecar.jsonvalues import SAFE_INTEGER, from_struct, number_problems
from sidecar.v1 import sidecar_pb2
from tests.conftest import REGO
from tests.infra.sidecar import SidecarProcess

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.integers(min_value=-(2**53), max_value=2**53),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=30)
tricky_text = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["", " ", "read_file\x00", "r\u0300ead_file", "\u202eelif_daer", "read_file\n", "../../etc", "x" * 257,
                     "\ud7ff", "🔥" * 70, "READ_FILE", "search_docs"]),
)
metadata_values = st.one_of(
    st.sampled_from([
        ("authorization", "Bearer "), ("authorization", "Bearer a.b.c"), ("authorization", "Basic Zm9vOmJhcg=="),
        ("authorization", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJzcGlmZmU6Ly9ldmlsLm9yZy94In0."),
        ("x-spiffe-delegation", "not-a-token"), ("x-spiffe-delegation", ",,,"),
        ("traceparent", "00-00000000000000000000000000000000-0000000000000000-01"),
        ("traceparent", "garbage"), ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"),
    ]),
    st.tuples(st.sampled_from(["authorization", "x-spiffe-delegation", "traceparent", "x-other"]),
              st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)),
)


@pytest.fixture(scope="module")
def fuzz_sidecar(tmp_path_factory):
    yield from serve_fuzz_sidecar(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def show_sidecar(tmp_path_factory):
    """A sidecar of its own for the `evidence show` property: each example scans the log for its
    decision, which stays short here instead of holding every other property's calls."""
    yield from serve_fuzz_sidecar(tmp_path_factory.mktemp("show"))


def serve_fuzz_sidecar(workdir):
    bundle = workdir / "rego"
    import shutil

    shutil.copytree(REGO, bundle)
    config = {
        "listen": {"tcp": "127.0.0.1:0", "unix": str(workdir / "s.sock")},
        "policy": {"dir": str(bundle), "reload": False},
        "evidence": {"dir": str(workdir / "evidence")},
        "telemetry": {"exporter": "none"},
        "identity": {"sources": ["dev"]},
    }
    (workdir / "c.yaml").write_text(yaml.safe_dump(config))
    sidecar = SidecarProcess(workdir / "c.yaml", workdir / "log")
    sidecar.start()
    sidecar.wait_serving()
    channel = grpc.insecure_channel(f"unix:{workdir / 's.sock'}")
    state = {"channel": channel, "calls": 0, "sidecar": sidecar, "evidence": workdir / "evidence"}
    yield state
    channel.close()
    assert sidecar.stop() == 0


def raw_authorize(state, payload: bytes, metadata=()) -> tuple[grpc.StatusCode, sidecar_pb2.AuthorizeResponse | None, str]:
    method = state["channel"].unary_unary("/sidecar.v1.ToolGate/Authorize", request_serializer=lambda b: b,
                                          response_deserializer=sidecar_pb2.AuthorizeResponse.FromString)
    state["calls"] += 1
    try:
        return grpc.StatusCode.OK, method(payload, timeout=10, metadata=metadata), ""
    except grpc.RpcError as error:
        return error.code(), None, error.details() or ""


def assert_answered(code, response, details):
    if code == grpc.StatusCode.OK:
        assert response.outcome in (sidecar_pb2.OUTCOME_ALLOW, sidecar_pb2.OUTCOME_DENY, sidecar_pb2.OUTCOME_ESCALATE)
        assert response.reasons and all(response.reasons) and response.decision_id
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "malformed_request" in details and "recorded as decision" in details


@FUZZ
@given(tool=tricky_text, arguments=st.dictionaries(st.text(max_size=20), json_values, max_size=6),
       call_id=st.text(max_size=40), task=st.text(max_size=40), signals=st.dictionaries(st.text(max_size=10), json_values, max_size=3),
       metadata=st.lists(metadata_values, max_size=3))
def test_generated_requests_are_each_decided(fuzz_sidecar, tool, arguments, call_id, task, signals, metadata):
    request = sidecar_pb2.AuthorizeRequest(tool=tool, call_id=call_id, task_id=task)
    try:
        request.arguments.update(arguments)
        request.signals.update(signals)
    except (ValueError, TypeError):
        return  # not representable as a Struct: the client library refuses it before sending
    code, response, details = raw_authorize(fuzz_sidecar, request.SerializeToString(), tuple(metadata))
    assert_answered(code, response, details)


@FUZZ
@given(payload=st.binary(max_size=400))
def test_arbitrary_bytes_are_denied_or_rejected(fuzz_sidecar, payload):
    assert_answered(*raw_authorize(fuzz_sidecar, payload))


@FUZZ
@given(depth=st.integers(min_value=60, max_value=120), width=st.integers(min_value=0, max_value=3),
       blob=st.integers(min_value=0, max_value=1_200_000))
def test_deep_and_huge_arguments_are_denied(fuzz_sidecar, depth, width, blob):
    nested: dict = {"leaf": "x" * min(blob, 2000)}
    for level in range(depth):
        nested = {f"k{level}": nested, **{f"w{i}": i for i in range(width)}}
    arguments = {"path": "/workspace/a", "nested": nested}
    if blob > 1_048_576:
        arguments = {"path": "/workspace/a", "blob": "y" * blob}
    request = sidecar_pb2.AuthorizeRequest(tool="read_file")
    try:
        request.arguments.update(arguments)
    except (ValueError, RecursionError):
        return
    code, response, details = raw_authorize(fuzz_sidecar, request.SerializeToString())
    if code == grpc.StatusCode.OK:
        assert response.outcome == sidecar_pb2.OUTCOME_DENY, response.reasons
    assert_answered(code, response, details)


# Kind 1 (issue 11 §1): numbers a Struct would change. Integers of any size up to 2^64, integral and
# non-integral doubles near and past 2^53, NaN, ±Infinity, -0.0, in arguments and signals at any depth.
edge_numbers = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([SAFE_INTEGER, SAFE_INTEGER + 1, SAFE_INTEGER + 2, -SAFE_INTEGER - 1, 2**63, 1e20, -1e300, 0.5,
                     1.0, -0.0, 2.0**52 + 0.5, 5e-324, math.nan, math.inf, -math.inf]),
    st.floats(),
)
numeric_values = st.recursive(st.one_of(edge_numbers, st.text(max_size=5)), lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)
numeric_objects = st.dictionaries(st.text(max_size=8), numeric_values, max_size=4)


@FUZZ
@given(arguments=numeric_objects, signals=st.one_of(st.none(), numeric_objects))
def test_numbers_arrive_exactly_or_are_refused_naming_the_field(fuzz_sidecar, arguments, signals):
    try:
        request = build_request("search_docs", arguments, signals=signals)
        exact = True
    except NotExact:  # the client library refuses it; a raw caller sends the rounded Struct anyway
        exact = False
        request = sidecar_pb2.AuthorizeRequest(tool="search_docs")
        request.arguments.update(arguments)
        if signals is not None:
            request.signals.update(signals)
    code, response, details = raw_authorize(fuzz_sidecar, request.SerializeToString())
    assert_answered(code, response, details)
    numbers_rule = [r for r in response.reasons if "is not a JSON number" in r or "(2^53−1)" in r]
    if exact:
        assert not numbers_rule, response.reasons
        # What the sidecar decided on, recorded and would bind an approval to is what the client runs.
        assert response.arguments_digest == arguments_digest(arguments)
    else:
        received = {"arguments": from_struct(request.arguments)}
        if request.HasField("signals"):
            received["signals"] = from_struct(request.signals)
        expected = [f"invalid_{field}: {problem}" for field, value in received.items()
                    for problem in number_problems(value, field)]
        assert response.outcome == sidecar_pb2.OUTCOME_DENY
        assert numbers_rule and set(numbers_rule) <= set(expected), (response.reasons, expected)


# Kind 6 (issue 11 §6): text that hides itself, in every field a person reads in `evidence show`.
HIDDEN_CHARS = ["\x1b[2K", "\r", "\n", "\x00", "\x7f", "\x9b", "\x85", "\u202e", "\u2066", "\u200f", "\u061c",
                "\u200b", "\ufeff", "\u00ad", "\U000e0041", "\ufe0f", "\u3164", "\u2028", "\u2029", "\u00a0", "[!]"]
hiding_text = st.builds(lambda a, h, b: a + h + b, st.text(max_size=6), st.sampled_from(HIDDEN_CHARS),
                        st.text(max_size=6))
HIDDEN_EXAMPLES = min(200, max(20, EXAMPLES // 8))


@settings(FUZZ, max_examples=HIDDEN_EXAMPLES)
@given(tool=st.one_of(hiding_text, st.sampled_from(["search_docs\u3164", "send_email\ufe0f", "read_file"])),
       task=hiding_text, server=hiding_text, key=hiding_text, value=hiding_text, intent=hiding_text)
def test_hidden_characters_read_escaped_in_evidence_show(show_sidecar, tool, task, server, key, value, intent):
    request = sidecar_pb2.AuthorizeRequest(tool=tool, task_id=task, server=server, intent=intent)
    try:
        request.arguments.update({key: value, "q": [value]})
        payload = request.SerializeToString()
    except ValueError:
        return  # lone surrogates cannot be sent
    code, response, details = raw_authorize(show_sidecar, payload)
    assert_answered(code, response, details)
    decision_id = response.decision_id if response else details.rpartition("recorded as decision ")[2].strip()
    table, as_json = io.StringIO(), io.StringIO()
    deadline = time.monotonic() + 60  # as soon as it is recorded; room for a loaded machine
    while not show(show_sidecar["evidence"], Filter(decision_id=decision_id), as_json=True, out=as_json):
        assert time.monotonic() < deadline, "the decision was not recorded"
        time.sleep(0.05)
    show(show_sidecar["evidence"], Filter(decision_id=decision_id), as_json=False, out=table)
    for text in (table.getvalue(), as_json.getvalue()):
        assert not any(hidden(ch) for ch in text.replace("\n", "")), text
    [record] = [json.loads(line) for line in as_json.getvalue().split("\n")[:-1]]
    assert record["decision_id"] == decision_id and record.get("tool") in (tool, "", None)
    row = table.getvalue().split("\n")[1]
    if record.get("tool") == tool and needs_flag(tool):
        assert row.split()[4].startswith("[!]"), row  # SEQ TIME KIND OUTCOME TOOL: the tool cell is flagged


# -- kind 2 (issue 11): numbers and text the evidence writer and verifier must agree on -----------------

# Struct numbers are doubles: these are the ones RFC 8785 writes as integer literals past 2^53 (1e20 →
# 100000000000000000000), the exponent forms around 1e21, and the safe neighbours of both.
kind2_numbers = st.one_of(
    st.floats(min_value=2.0**53 - 8, max_value=1e21, allow_nan=False),
    st.floats(min_value=-1e21, max_value=-(2.0**53) + 8, allow_nan=False),
    st.sampled_from([1e20, -1e20, 1e16, 2.0**53, 2.0**53 - 1, 1e21, 1e22, 9.999999999999999e20, 5e-324, 1e308, 0.1]),
    st.floats(allow_nan=False, allow_infinity=False),
)
kind2_values = st.recursive(
    st.one_of(kind2_numbers, st.text(max_size=20), st.booleans(), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def kind2_unreadable(value) -> bool:
    """Whether a value holds a float the canonical writer must refuse (integral, past 2^53 - 1, below 1e21)."""
    if isinstance(value, float):
        return value.is_integer() and 2**53 - 1 < abs(value) < 1e21
    if isinstance(value, dict):
        return any(kind2_unreadable(v) for v in value.values())
    if isinstance(value, list):
        return any(kind2_unreadable(v) for v in value)
    return False


@FUZZ
@given(signals=st.dictionaries(st.text(max_size=8), kind2_values, min_size=1, max_size=4),
       arguments=st.dictionaries(st.text(max_size=8), kind2_values, max_size=4))
def test_kind2_numbers_are_denied_or_sealed_readably(fuzz_sidecar, signals, arguments):
    """Any number a caller sends is either refused before sealing (deny, with a reason) or read back intact."""
    request = sidecar_pb2.AuthorizeRequest(tool="search_docs")
    request.signals.update(signals)
    request.arguments.update(arguments)
    code, response, details = raw_authorize(fuzz_sidecar, request.SerializeToString())
    assert_answered(code, response, details)
    as_sent = json.loads(json_format.MessageToJson(request.signals)), json.loads(json_format.MessageToJson(request.arguments))
    if any(kind2_unreadable(v) for v in as_sent):
        assert response.outcome == sidecar_pb2.OUTCOME_DENY, response.reasons
        assert any(r.startswith(("invalid_signals:", "invalid_arguments:")) for r in response.reasons), response.reasons


def test_kind2_the_fuzzed_log_verifies_and_a_restart_accepts_it(fuzz_sidecar, tmp_path):
    """After the generated calls, the live log is consistent, and a second writer recovering a copy starts."""
    import shutil

    from sidecar.evidence.log import EvidenceLog
    from sidecar.evidence.verify import verify_dir

    report = verify_dir(fuzz_sidecar["evidence"])
    assert report.ok, report.problems
    copy = tmp_path / "copy"
    shutil.copytree(fuzz_sidecar["evidence"], copy, ignore=shutil.ignore_patterns("LOCK"))
    EvidenceLog.open(copy, instance_id="recovery", key_provider=None).close(checkpoint=False)
    assert verify_dir(copy).ok


def test_zz_every_fuzzed_call_was_recorded_and_the_server_is_alive(fuzz_sidecar, capsys):
    """Runs last in this module: the process survived and wrote one decision record per call."""
    assert fuzz_sidecar["sidecar"].alive
    code, response, _ = raw_authorize(fuzz_sidecar, sidecar_pb2.AuthorizeRequest(tool="search_docs").SerializeToString())
    assert code == grpc.StatusCode.OK
    deadline = time.monotonic() + 60  # as soon as all are recorded; room for a loaded machine
    while True:
        decisions = sum(1 for _line, record in iter_lines(fuzz_sidecar["evidence"]) if record.get("kind") == "decision")
        if decisions >= fuzz_sidecar["calls"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert decisions == fuzz_sidecar["calls"]
    with capsys.disabled():
        print(f"\nfuzz: {fuzz_sidecar['calls']} calls, each answered and recorded; the sidecar stayed up")
