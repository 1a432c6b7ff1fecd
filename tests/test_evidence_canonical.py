"""One canonical form for writing and verifying (issue 11, section 2).

Whatever the writer seals, the verifier reads back to the same bytes, also
after a crash left it last; whatever has no such form is refused before
sealing (the call is denied, and the denial is recorded with the value
described, never written); recovery never refuses a record the writer made.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.calls import ToolCall, check_call
import rfc8785

from sidecar.calls import depth_of
from sidecar.canonical import MAX_DEPTH, NotCanonicalizable, canonical_json, plain_form, parse_json, sha256_digest
from sidecar.evidence.log import EvidenceLog
from sidecar.evidence.recorder import EvidenceRecorder
from sidecar.evidence.records import recordable
from sidecar.evidence.verify import verify_dir
from sidecar.v1 import sidecar_pb2
from tests.conftest import REGO
from tests.infra.sidecar import SidecarProcess
from tests.test_evidence_log import make_event

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# Numbers RFC 8785 writers and JSON readers disagree on, and their safe neighbours.
awkward_floats = st.one_of(
    st.floats(),  # NaN, +-Infinity, -0.0, subnormals
    st.sampled_from([1e20, -1e20, 1e16, 2.0**53, 2.0**53 - 1, 2.0**53 + 2, 1e21, 9.999999999999999e20, 5e-324,
                     1.7976931348623157e308, 123456789012345.0, 1.2345678901234567e25, 0.1, 100.0]),
    st.floats(min_value=2.0**53 - 4, max_value=1e21, allow_nan=False),
    st.floats(min_value=-1e21, max_value=-(2.0**53) + 4, allow_nan=False),
)
awkward_ints = st.one_of(
    st.integers(min_value=-(2**53), max_value=2**53),
    st.sampled_from([2**53 - 1, 2**53, -(2**53) + 1, -(2**53), 2**64, -(2**63), 10**30]),
)
awkward_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u2028\u2029", "\ufeff", "\U0001f525", '"\\', "</script>",
                     "12345678901234567890", "1e20", "NaN"]),
)
scalars = st.one_of(st.none(), st.booleans(), awkward_floats, awkward_ints, awkward_text)
# Keys of every kind a Python caller (or a JSON parser) can hand over.
keys = st.one_of(awkward_text, st.integers(min_value=-5, max_value=5), st.none(), st.booleans(), st.just(1.5))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(keys, inner, max_size=4),
    ),
    max_leaves=20,
)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@PROPERTY
@given(value=values)
def test_what_the_writer_accepts_the_reader_gets_back_byte_for_byte(value):
    try:
        written = canonical_json(value)
    except NotCanonicalizable:
        return
    assert canonical_json(parse_json(written)) == written


# Floats of every magnitude, around where orjson and ECMAScript switch notation, and integer-valued ones.
any_magnitude = st.one_of(
    st.builds(lambda m, e: m * 10.0**e, st.floats(min_value=-10, max_value=10, allow_nan=False),
              st.integers(min_value=-12, max_value=22)),
    st.builds(lambda m, e: m * 10.0**e, st.floats(min_value=-10, max_value=10, allow_nan=False),
              st.integers(min_value=-320, max_value=300)),
    st.floats(min_value=-2e-5, max_value=2e-5),  # both sides of 1e-6 and 1e-5, subnormals
    st.sampled_from([1e-6, 9.999999999999999e-7, 1.0000000000000002e-6, 1e-5, 9.999999999999999e-6, 5e-324,
                     2.0**52 + 0.5, 4503599627370495.5, 1e15 + 0.5]),
)
# Keys that sort differently by code point and by UTF-16 code unit (U+E000-U+FFFF versus past U+FFFF).
sort_sensitive_keys = st.text(alphabet=st.sampled_from(["a", "\ue000", "\uffff", "\U00010000", "\U0001f525", "z"]),
                              max_size=3)
fast_values = st.recursive(
    st.one_of(scalars, any_magnitude),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(awkward_text, sort_sensitive_keys), inner, max_size=5)),
    max_leaves=25,
)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(value=fast_values)
def test_the_fast_path_writes_exactly_what_rfc8785_writes(value):
    """orjson is used only where its bytes are the RFC 8785 bytes; elsewhere rfc8785 decides."""
    fast = plain_form(value)
    if fast is None:
        return
    assert fast[0] == rfc8785.dumps(value)
    assert fast[1] == depth_of(value, limit=10**6)  # and how deep it nests, as the gate counts it


@pytest.mark.parametrize(
    "value",
    [0.1, 1e-5, 0.000025, 1234.5678, 123456789012345.6, -0.5, 1e15 + 0.5, 9.999999999999999e-7, -1e-7, 5e-324,
     1.7e-300, {"\ue000": 1, "\U0001f525": 2, "a": 0.1},
     {"k": ["x" * 40, 2**53 - 1, -(2**53) + 1, True, None, "\u2028\x00\x1f\x7f"]}],
    ids=repr,
)
def test_the_fast_path_agrees_on_its_boundaries(value):
    assert canonical_json(value) == rfc8785.dumps(value)


def test_values_the_fast_path_leaves_to_rfc8785():
    """Each would be written differently by orjson (or not refused): the fast path steps aside."""
    cyclic: list = []
    cyclic.append(cyclic)
    for value in (100.0, -0.0, 1e-6, 1.5e-6, -9.999999999999999e-6, 1e21, float("nan"), float("inf"), 2**53, (1, 2), {1: "x"},
                  "\ud800", {"\ue000": 1, "\U0001f525": 2}, nested(65), cyclic, True.__class__):
        assert plain_form(value) is None, value


@pytest.mark.parametrize(
    "value",
    [1e20, -1e20, 2.0**53, {"n": 1e16}, [1.5e17], float("nan"), float("inf"), 2**53, -(2**63), "\ud800",
     {"\udfff": 1}, {1: "x"}, {None: 1}, {(1, 2): 1}, b"bytes", object(), {1, 2}, nested(MAX_DEPTH + 1)],
    ids=lambda value: "object()" if type(value) is object else repr(value),  # no address: the same id in every process (xdist)
)
def test_values_without_a_readable_canonical_form_are_refused(value):
    with pytest.raises(NotCanonicalizable):
        canonical_json(value)


@pytest.mark.parametrize(
    "value,expected",
    [(1e21, b"1e+21"), (2.0**53 - 1, b"9007199254740991"), (100.0, b"100"), (-0.0, b"0"),
     ("12345678901234567890", b'"12345678901234567890"'), ({"b": [1.5, "x\u2028"], "a": None}, b'{"a":null,"b":[1.5,"x\xe2\x80\xa8"]}'),
     (nested(MAX_DEPTH), b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)],
    ids=repr,
)
def test_values_that_read_back_are_written(value, expected):
    assert canonical_json(value) == expected


def test_the_reader_refuses_what_json_would_let_through():
    for text in (b'{"a":1,"a":2}', b"NaN", b'{"x":Infinity}', b"[" * 5000 + b"]" * 5000):
        with pytest.raises(ValueError):
            parse_json(text)


@PROPERTY
@given(value=values)
def test_recordable_always_gives_something_the_writer_accepts(value):
    kept = recordable(value)
    written = canonical_json(kept)
    assert canonical_json(parse_json(written)) == written
    try:
        canonical_json(value)
    except NotCanonicalizable:
        assert "unrecordable" in written.decode()
    else:
        assert kept is value


# -- the writer, the verifier and crash recovery agree -------------------------------------------------


@pytest.fixture(scope="module")
def shared_log(tmp_path_factory):
    directory = tmp_path_factory.mktemp("canonical") / "ev"
    state = {"log": EvidenceLog.open(directory, instance_id="canon", checkpoint_every=7, checkpoint_seconds=0,
                                     key_provider=None), "dir": directory, "records": 0}
    yield state
    state["log"].close(checkpoint=False)


def crash_and_reopen(state, torn: bytes = b"") -> None:
    """Stop the writer as a SIGKILL would (no final checkpoint), maybe leave a torn write, open again."""
    state["log"].close(checkpoint=False)
    if torn:
        newest = sorted(state["dir"].glob("evidence-*.jsonl"))[-1]
        with open(newest, "ab") as f:
            f.write(torn)
    state["log"] = EvidenceLog.open(state["dir"], instance_id="canon", checkpoint_every=7, checkpoint_seconds=0,
                                    key_provider=None)


caller_text = awkward_text
caller_json = values


@PROPERTY
@given(
    tool=caller_text, server=caller_text, call_id=caller_text, task_id=caller_text, intent=caller_text,
    escalation_id=caller_text, approver=caller_text, signals=caller_json, arguments=caller_json,
    obligations=st.dictionaries(keys, values, max_size=3), reasons=st.lists(caller_text, max_size=3),
    torn=st.sampled_from([b"", b'{"kind":"decision","seq":', b"\xff\xfe"]),
)
def test_every_sealed_record_verifies_also_after_a_crash_left_it_last(
    shared_log, tool, server, call_id, task_id, intent, escalation_id, approver, signals, arguments, obligations,
    reasons, torn,
):
    """Arbitrary JSON-ish values in every caller-controlled field → seal → verify; crash → start → verify."""
    _problems, digest = check_call(ToolCall(tool="t", arguments=arguments), max_bytes=1 << 20, max_depth=64)
    event = make_event(
        shared_log["records"], arguments_digest=digest, tool=tool, server=server, call_id=call_id, task_id=task_id, intent=intent,
        escalation_id=escalation_id, approver=approver, signals=signals, arguments=arguments,
        obligations=obligations, reasons=tuple(reasons),
    )
    recorder = EvidenceRecorder(shared_log["log"], None, arguments_mode="clear")
    receipt = shared_log["log"].append_sync("decision", recorder.fields_for(event), timeout=10)
    # other kinds (written by the escalation stage) with the same values
    shared_log["log"].append_sync("approval", {"note": intent, "approver": approver, "extra": signals}, timeout=10)
    shared_log["records"] += 1
    crash_and_reopen(shared_log, torn)
    startup = json.loads(sorted(shared_log["dir"].glob("evidence-*.jsonl"))[-1].read_bytes().splitlines()[-1])
    assert startup["kind"] == "startup" and startup["seq"] == receipt.seq + 2
    assert (startup["recovered"] is not None) == bool(torn)
    if shared_log["records"] % 25 == 0:
        report = verify_dir(shared_log["dir"])
        assert report.ok, report.problems


def test_zz_the_whole_property_log_verifies(shared_log):
    report = verify_dir(shared_log["dir"])
    assert report.ok, report.problems
    assert report.records > 3 * shared_log["records"]


# -- a caller cannot get an unrecordable value sealed: the call is denied --------------------------------


def _texts_ok(call: ToolCall) -> bool:
    for value in (call.tool, call.server, call.call_id, call.task_id, call.intent, call.escalation_id):
        try:
            canonical_json(value)
        except NotCanonicalizable:
            return False
    return True


@PROPERTY
@given(tool=caller_text, server=caller_text, call_id=caller_text, task_id=caller_text, intent=caller_text,
       signals=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), values, max_size=3)),
       arguments=st.dictionaries(st.text(max_size=5), values, max_size=3))
def test_a_call_with_a_value_that_has_no_canonical_form_never_reaches_policy(
    tool, server, call_id, task_id, intent, signals, arguments
):
    call = ToolCall(tool=tool, arguments=arguments, call_id=call_id, task_id=task_id, intent=intent,
                    signals=signals, server=server)
    problems, digest = check_call(call, max_bytes=1 << 20, max_depth=64)
    try:
        canonical_json(arguments)
        canonical_json(signals)
        recordable_input = _texts_ok(call)
    except NotCanonicalizable:
        recordable_input = False
    if not recordable_input:
        assert problems, call
    assert digest.startswith("sha256:")


# -- the issue's example, through the real sidecar, with kill -9 ------------------------------------------


def _serve(workdir: Path, config: dict) -> SidecarProcess:
    (workdir / "c.yaml").write_text(yaml.safe_dump(config))
    sidecar = SidecarProcess(workdir / "c.yaml", workdir / "log")
    sidecar.start()
    sidecar.wait_serving()
    return sidecar


def test_a_float_past_2_53_is_denied_recorded_described_and_survives_kill_9(tmp_path):
    config = {
        "listen": {"tcp": "", "unix": str(tmp_path / "s.sock")},  # not the default port another run may hold
        "policy": {"dir": str(REGO), "reload": False},
        "evidence": {"dir": str(tmp_path / "ev")},
        "telemetry": {"exporter": "none"},
        "identity": {"sources": ["dev"]},
    }
    sidecar = _serve(tmp_path, config)
    try:
        request = sidecar_pb2.AuthorizeRequest(tool="search_docs")
        request.arguments.update({"query": "x"})
        request.signals.update({"n": 1e20, "risk_score": 0.1})
        with grpc.insecure_channel(f"unix:{tmp_path / 's.sock'}") as channel:
            method = channel.unary_unary("/sidecar.v1.ToolGate/Authorize", request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=sidecar_pb2.AuthorizeResponse.FromString)
            response = method(request, timeout=10)
    finally:
        sidecar.stop(signal.SIGKILL)  # the denial is the last record when it dies
    assert response.outcome == sidecar_pb2.OUTCOME_DENY
    assert any(r.startswith("invalid_signals:") and "2^53" in r for r in response.reasons), response.reasons
    lines = b"".join(p.read_bytes() for p in sorted((tmp_path / "ev").glob("evidence-*.jsonl"))).splitlines()
    last = json.loads(lines[-1])
    assert last["kind"] == "decision" and last["decision_id"] == response.decision_id and last["outcome"] == "deny"
    assert last["signals"]["n"]["unrecordable"] and last["signals"]["n"]["repr_digest"].startswith("sha256:")
    assert last["signals"]["risk_score"] == 0.1
    assert b"100000000000000000000" not in b"".join(lines)
    assert verify_dir(tmp_path / "ev").ok

    assert _serve(tmp_path, config).stop() == 0  # recovery does not refuse the record the writer made
    report = verify_dir(tmp_path / "ev")
    assert report.ok, report.problems
    assert report.kinds["startup"] == 2


near_hash = st.sampled_from(["hash", "h", "ha", "has", "hasg", "hasi", "hash0", "hash_", "hat", "Hash", "HASH", "",
                             "a", "z", "é", "ｈａｓｈ", "\U0001d400", "\ue000", "kind", "seq", "prev_hash"])


@PROPERTY
@given(record=st.dictionaries(st.one_of(near_hash, keys), values, max_size=8))
def test_seal_writes_the_canonical_form_of_the_whole_record(record):
    """`seal` serializes the members before and after `hash` apart: the line must be canonical_json of
    the record with its hash, and the hash that of the record without it, for any keys around `hash`."""
    from sidecar.evidence.records import record_hash, seal

    try:
        expected_body = canonical_json({k: v for k, v in record.items() if k != "hash"})
    except NotCanonicalizable:
        with pytest.raises(NotCanonicalizable):
            seal(dict(record))
        return
    sealed = dict(record)
    line = seal(sealed)
    assert sealed["hash"] == sha256_digest(expected_body) == record_hash(sealed)
    assert line == canonical_json(sealed) + b"\n"
