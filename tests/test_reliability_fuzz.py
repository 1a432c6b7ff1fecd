"""Bad input fuzzing: generated requests, raw bytes and metadata against a real sidecar process.

Every answer must be a decision with reasons (or INVALID_ARGUMENT for bytes
that are not a message), the process must stay up, and every call must be in
the evidence log. `make test` runs FUZZ_EXAMPLES=1500 per property (about
4,500 calls); `make reliability` runs 10,000+.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.evidence.show import iter_lines
from sidecar.v1 import sidecar_pb2
from tests.conftest import REGO, REPO

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
    workdir = tmp_path_factory.mktemp("fuzz")
    bundle = workdir / "rego"
    import shutil

    shutil.copytree(REGO, bundle)
    config = {
        "listen": {"tcp": "127.0.0.1:0", "unix": str(workdir / "s.sock")},
        "policy": {"dir": str(bundle), "reload": False},
        "evidence": {"dir": str(workdir / "evidence")},
        "telemetry": {"exporter": "none"},
    }
    (workdir / "c.yaml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--config", str(workdir / "c.yaml")],
                               stdout=subprocess.PIPE, stderr=(workdir / "log").open("w"), text=True, cwd=REPO)
    assert "serving" in process.stdout.readline(), (workdir / "log").read_text()
    channel = grpc.insecure_channel(f"unix:{workdir / 's.sock'}")
    state = {"channel": channel, "calls": 0, "process": process, "evidence": workdir / "evidence"}
    yield state
    channel.close()
    process.terminate()
    process.wait(timeout=15)


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


def test_zz_every_fuzzed_call_was_recorded_and_the_server_is_alive(fuzz_sidecar, capsys):
    """Runs last in this module: the process survived and wrote one decision record per call."""
    assert fuzz_sidecar["process"].poll() is None
    code, response, _ = raw_authorize(fuzz_sidecar, sidecar_pb2.AuthorizeRequest(tool="search_docs").SerializeToString())
    assert code == grpc.StatusCode.OK
    deadline = time.monotonic() + 10
    while True:
        decisions = sum(1 for _line, record in iter_lines(fuzz_sidecar["evidence"]) if record.get("kind") == "decision")
        if decisions >= fuzz_sidecar["calls"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert decisions == fuzz_sidecar["calls"]
    with capsys.disabled():
        print(f"\nfuzz: {fuzz_sidecar['calls']} calls, each answered and recorded; the sidecar stayed up")
