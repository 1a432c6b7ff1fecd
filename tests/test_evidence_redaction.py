"""Secrets are never written in clear (issue 11, §7): one rule set, every field of every record and span.

Planted secrets (each a distinct PLANT-n) go into every caller-controlled
place a real sidecar takes: arguments at any depth and in any shape, signals,
intent, task id, call id, gRPC metadata, approvers' notes. Then every field
of every record kind (decision, escalation, approval, human_denial, expiry,
task_end, checkpoint, startup, and invocation when present) in the log and the
checkpoint mirror, and every attribute and event attribute of every span
the collector received, is walked for them.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from typing import Any, Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.canonical import canonical_json
from sidecar.client import AsyncClient, build_request
from sidecar.escalation.client import ApprovalsClient
from sidecar.escalation.preview import argument_preview
from sidecar.evidence.records import KINDS, default_mirror_path
from sidecar.evidence.redaction import REDACTED, Redactor
from sidecar.evidence.verify import verify_dir
from sidecar.reasons import SIDECAR_CODES
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import REPO
from tests.doubles.escalation import ALICE, BOB, make_config, records
from tests.doubles.otlp_receiver import OtlpReceiver

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every (path, string) in a JSON value: keys and values, at any depth."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, child in value.items():
            yield f"{where}.{key}", str(key)
            yield from strings(child, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, child in enumerate(value):
            yield from strings(child, f"{where}[{i}]")


def leaks(value: Any, needle: str = "PLANT-") -> list[str]:
    return [f"{path}: {text[:120]!r}" for path, text in strings(value) if needle in text]


# -- the rule set -------------------------------------------------------------------------------------


def test_the_issue_example_signals_api_key():
    clean = Redactor().record({"signals": {"api_key": "sk-TWO"}, "arguments": {"query": "x"}})
    assert clean["signals"] == {"api_key": REDACTED} and clean["redacted"] == ["signals.api_key"]


@pytest.mark.parametrize(
    "key",
    ["api_key", "API-Key", "x_api_key", "X-API-KEY", "xApiKey", "apiKey", "api.key", "Api Key", "password", "PassWord",
     "db_password", "passwd", "passphrase", "client_secret", "clientSecret", "SECRET", "token", "access_token",
     "refreshToken", "id-token", "Authorization", "proxy-authorization", "credentials", "aws_access_key_id",
     "private_key", "privateKey", "cookie", "Set-Cookie", "session", "sessionId", "auth", "AUTH", "pwd", "pin", "otp",
     "jwt", "bearer", "custom_field", "ＡＰＩ＿ＫＥＹ", "Pａssword", "ＴＯＫＥＮ"],
)
def test_secret_keys_in_any_case_and_with_any_separator(key):
    redactor = Redactor(["custom"])
    for shape in ("PLANT-1", 12345, ["PLANT-1"], {"inner": "PLANT-1"}, None):
        clean, paths = redactor.value({"outer": [{key: shape}]})
        assert clean == {"outer": [{key: REDACTED}]} and paths == [f"outer[0].{key}"]


@pytest.mark.parametrize("key", ["author", "authority", "path", "query", "keyboard", "passenger", "tokenizer_name"[:0] or "tool"])
def test_ordinary_keys_are_kept(key):
    clean, paths = Redactor().value({key: "value"})
    assert clean == {key: "value"} and paths == []


@pytest.mark.parametrize(
    "text",
    [
        "call it with api_key=PLANT-1 please",
        "password: PLANT-1",
        'config {"token": "PLANT-1", "n": 1}',
        "Authorization: Bearer PLANT-1",
        "curl -H 'X-Api-Key: PLANT-1' https://example.org",
        "https://example.org/v1?x=1&access_token=PLANT-1&y=2",
        "postgres://app:PLANT-1@db:5432/orders",
        "Basic UExBTlQtMTpQTEFOVC0x",
        "-----BEGIN RSA PRIVATE KEY-----\nPLANT-1\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----\nPLANT-1 (cut short",
        "jwt_svid: token eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJQTEFOVC0xIn0.PLANT-1sig was refused",
        "secret='PLANT-1 with spaces'",
        "use api-key PLANT-1 for this",
        "the password hunter2-PLANT-1 is old",
        '{"headers": {"Cookie": "PLANT-1"}}',
        '[{"nested": {"db": {"password": ["PLANT-1"]}}}]',
        # an assignment inside the value of another
        "note: password=PLANT-1",
        "https://api.example.org/v1?api_key=PLANT-1",  # the first query parameter, after `https:`
        "url=https://h/x?token=PLANT-1&page=2",
        "password=token=PLANT-1",
        'label: "x" secret=PLANT-1',
        "k: 'token=PLANT-1'",
        # percent-encoding: a server reads `to%6Ben=` as `token=` (RFC 3986, section 2.1), so do the rules
        "https://api.example.org/v1?to%6Ben=PLANT-1",
        "a=1&pass%77ord=PLANT-1&b=2",
        "api%2Dkey%3A%20PLANT-1",
        "Authorization%3A%20Bearer%20PLANT-1",
        "q=to%256Ben%253DPLANT-1",  # encoded twice
        '{"to%6Ben": "PLANT-1"}',
        "next=https%3A%2F%2Fu%3APLANT-1%40db%2F",  # a URL's password, encoded inside another URL
    ],
)
def test_secrets_inside_strings(text):
    clean, paths = Redactor().value({"body": text})
    assert "PLANT-1" not in clean["body"] and "UExBTlQtMTpQTEFOVC0x" not in clean["body"], clean
    assert paths == ["body"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('token="PLANT-1 never closed', 'token="[REDACTED]'),  # a quote never closed: the rest of the text
        ("token='PLANT-1 never closed\nnext line", "token='[REDACTED]\nnext line"),  # ...of the line
        ("a" * 100 + "_token=PLANT-1", "a" * 100 + "_token=[REDACTED]"),  # a key of any length
        ("9token=PLANT-1", "9token=[REDACTED]"),  # a key is the whole token, digits first too
        ("x-eyJhbGciOi.eyJzdWIiOi.PLANT-1", "x-[REDACTED]"),  # a JWT after a hyphen
        ("token=a token=b token=PLANT-1", "token=[REDACTED] token=[REDACTED] token=[REDACTED]"),
    ],
)
def test_text_rule_edges(text, expected):
    assert Redactor().text(text) == expected


HOSTILE_TEXTS = {  # shapes that made a text rule rescan the same run from every position (time quadratic in size)
    "assignment chain": "token " + "x=" * 500_000,
    "one long token": "token " + "a" * 1_000_000,
    "repeated key": "token=" * 170_000,
    "unclosed quotes": 'token="' * 140_000,
    "unclosed single quotes": "token='" * 140_000,
    "percent-encoding layers": "token=" + "%25" * 330_000,
    "URL scheme run": "password " + "a" * 1_000_000 + "://",
    "JWT starts": "token eyJa-" * 90_000,
    "JWT without its last dot": "token eyJaaaa.eyJ" + "a-" * 500_000,
    "URL userinfo starts": "a://b:" * 170_000,
    "bearer": "bearer " * 140_000,
    "PEM labels": "-----BEGIN PRIVATE KEY-----" + "-----END AAAA " * 70_000,
}


def test_text_rules_take_time_linear_in_the_text():
    """A caller's megabyte of text is redacted on the event loop: every rule must scan it in linear time.

    A liveness bound, not a speed figure: each shape here took minutes to hours at this size
    when a rule rescanned a run from every position, and takes well under a second now. They
    run in a child process, so a regression fails this test instead of hanging the suite.
    """
    script = (
        "import json, sys\n"
        "from sidecar.evidence.redaction import Redactor\n"
        "for name, text in json.load(sys.stdin).items():\n"
        "    clean, paths = Redactor().value({'t': text})\n"
        "    assert bool(paths) == (name not in ('assignment chain', 'one long token', 'URL userinfo starts')), name\n"
        "    print(name, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(HOSTILE_TEXTS), capture_output=True,
                          text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:-1] == list(HOSTILE_TEXTS)


def test_text_without_secrets_is_left_as_it_is():
    for text in ("summarise the notes", "select 1", "a=b; c: d", "{not json", "spiffe://example.org/ns/a/sa/token-reader",
                 "the basic idea", '{"author": "x"}', "token limit exceeded", "session started"):
        assert Redactor().value({"t": text}) == ({"t": text}, [])


def test_top_level_record_names_are_the_sidecar_schema_not_caller_keys():
    fields = {"credential_id": "cred-7", "session": "s", "signals": {"session": "PLANT-1"}}
    clean = Redactor().record(fields)
    assert clean["credential_id"] == "cred-7" and clean["session"] == "s" and clean["signals"]["session"] == REDACTED


@pytest.mark.parametrize("code", sorted(c for c in SIDECAR_CODES if Redactor().is_secret_key(c)))
def test_the_sidecars_own_reason_codes_are_not_read_as_secret_keys(code):
    """A reason the sidecar writes keeps its code, even one a key rule would call secret
    (`credential_unavailable: no JWT-SVID …`); its text is still redacted."""
    reason = f"{code}: no JWT-SVID for audience 'closer' from the Workload API: no answer within 0.5 s"
    assert Redactor().record({"reasons": [reason]}) == {"reasons": [reason]}
    leaky = Redactor().record({"reasons": [f"{code}: fetch failed, token=PLANT-1x", f"{code}: retry with password PLANT-2x9"]})
    assert leaks(leaky) == [] and all(r.startswith(f"{code}: ") for r in leaky["reasons"])
    assert leaky["redacted"] == ["reasons[0]", "reasons[1]"]


@pytest.mark.parametrize("reason", [
    "password: PLANT-1",  # a code policy wrote (not the sidecar's): read as a key like any text
    "api_key: PLANT-2",
    "credential_unavailablex: PLANT-3",
    " credential_unavailable : token=PLANT-4",
])
def test_codes_that_are_not_the_sidecars_own_get_the_text_rules(reason):
    clean = Redactor().record({"reasons": [reason], "signals": {"note": reason}})
    assert leaks(clean) == [], clean


def test_a_sidecar_code_outside_reasons_is_not_exempt():
    clean = Redactor().record({"arguments": {"note": "credential_unavailable: PLANT-1"}, "intent": "credential_unavailable: PLANT-2"})
    assert leaks(clean) == [], clean


def test_extra_keys_apply_to_the_record_that_names_them_only():
    base = Redactor()
    fields = {"arguments": {"attachments": "a.pdf", "mine": "m"}}
    for _ in range(2):  # the rule sets are remembered: the second round uses them again
        assert base.with_keys(["attachments"]).record(fields)["arguments"] == {"attachments": REDACTED, "mine": "m"}
        assert base.with_keys(["MINE"]).record(fields)["arguments"] == {"attachments": "a.pdf", "mine": REDACTED}
        assert base.record(fields)["arguments"] == fields["arguments"]
    for i in range(100):  # more key sets than are remembered
        assert base.with_keys([f"k{i}"]).record({"arguments": {f"k{i}": 1, "k": 2}})["arguments"] == {f"k{i}": REDACTED, "k": 2}


def test_the_preview_approvers_see_uses_the_same_rules():
    preview = argument_preview(
        {"headers": {"X-Api-Key": "PLANT-1"}, "url": "https://u:PLANT-2@h/", "custom": "PLANT-3", "mine": "PLANT-4"},
        redactor=Redactor(["custom"]), obligations={"redact_arguments": ["mine"]},
    )
    assert not leaks(preview), preview


secret_keys = st.builds(
    lambda word, case, sep, prefix: (prefix + sep if prefix else "") + {"lower": word, "upper": word.upper(),
                                                                       "title": word.title()}[case].replace("_", sep),
    st.sampled_from(["api_key", "password", "client_secret", "access_token", "private_key", "authorization", "cookie",
                     "session_id", "passwd", "x_auth_token", "credentials"]),
    st.sampled_from(["lower", "upper", "title"]),
    st.sampled_from(["_", "-", ".", "", " "]),
    st.sampled_from(["", "x", "my", "HTTP"]),
)
plain_keys = st.text(alphabet="abcdefghijklmnoqruvwxyz", min_size=1, max_size=6).filter(
    lambda k: not Redactor().is_secret_key(k))
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1),
                    st.text(alphabet="abc xyz", max_size=10))


@st.composite
def planted(draw):
    """A JSON value with a secret under a secret key somewhere, possibly inside a JSON string."""
    secret = {draw(secret_keys): draw(st.one_of(st.just("PLANT-1"), st.lists(st.just("PLANT-1"), min_size=1, max_size=2),
                                                 st.fixed_dictionaries({"v": st.just("PLANT-1")})))}
    value: Any = secret
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        wrap = draw(st.sampled_from(["dict", "list", "json"]))
        if wrap == "dict":
            value = {**draw(st.dictionaries(plain_keys, scalars, max_size=3)), draw(plain_keys): value}
        elif wrap == "list":
            items = draw(st.lists(scalars, max_size=3))
            items.insert(draw(st.integers(min_value=0, max_value=len(items))), value)
            value = items
        else:
            value = json.dumps(value) if not isinstance(value, str) else value
    return value


token_keys = st.one_of(
    st.builds(
        lambda word, upper, sep, prefix: (prefix + sep if prefix else "") + (word.upper() if upper else word).replace("_", sep),
        st.sampled_from(["api_key", "password", "client_secret", "access_token", "private_key", "authorization", "cookie",
                         "session_id", "passwd", "x_auth_token", "credentials"]),
        st.booleans(),
        st.sampled_from(["_", "-", ".", ""]),
        st.sampled_from(["", "x", "my", "HTTP"]),
    ),
    st.sampled_from(["pin", "PWD", "otp", "Jwt", "p-w", "a.u.t.h"]),  # whole names: secret only alone
)
prose = st.lists(st.sampled_from(["roadmap", "incident", "the", "ship", "ping", "map", "in", "x1", "a-b", "q.r", "to",
                                  "(see", "notes)", "42", "pass", "word", "auth", "or", "&", ";", "\t"]), max_size=6)


@PROPERTY
@given(before=prose, key=token_keys, joint=st.sampled_from(["=", ": ", ":", " = ", " ", "\t", '="', "='", ": '"]),
       after=prose)
def test_a_secret_in_prose_is_found_whatever_surrounds_it(before, key, joint, after):
    """The text rules' cheap pre-check joins letters within a token only: it must still see every key."""
    text = " ".join([*before, key + joint + "PLANT-1" + joint.strip(" :=\t"), *after])
    clean, paths = Redactor().value({"t": text})
    assert "PLANT-1" not in clean["t"], (text, clean)
    assert paths == ["t"]


@PROPERTY
@given(value=planted(), field=st.sampled_from(["arguments", "signals", "intent", "task_id", "note", "reasons", "obligations"]))
def test_a_secret_under_a_secret_key_never_survives_at_any_depth_or_shape(value, field):
    clean = Redactor().record({field: value, "decision_id": "d"})
    assert b"PLANT-1" not in canonical_json(clean)
    assert clean["redacted"]


@pytest.mark.parametrize(
    "text",
    [
        r'{"to\u006ben": "PLANT-1"}',  # an escaped letter
        r'{"\u0074\u006F\u006B\u0065\u006E": "PLANT-1"}',  # every letter escaped, either hex case
        r'[{"api\u005fkey": "PLANT-1"}]',  # an escaped separator
        r'{"tok\nen": "PLANT-1"}',  # a control character inside the key, dropped by normalization
        r'{"pass\tword": ["PLANT-1"]}',
        json.dumps({"ＡＰＩ＿ＫＥＹ": "PLANT-1"}),  # ensure_ascii: the fullwidth key written as \uff21...
        json.dumps({"outer": json.dumps({"secret": "PLANT-1"}).replace("c", r"\u0063")}),  # JSON in JSON
        r'{"note": "Authorization: Bearer\u0020PLANT-1"}',  # the scheme's space escaped
        r'{"url": "https://u:PLANT-1\u0040db/x"}',  # the URL's `@` escaped
    ],
)
def test_escapes_in_json_text_hide_no_secret(text):
    """JSON text is read as a reader would read it: escapes cannot hide a key or a credential from the rules."""
    clean, paths = Redactor().value({"body": text})
    assert "PLANT-1" not in json.dumps(json.loads(clean["body"]), ensure_ascii=False), clean
    assert paths == ["body"]


def _disguised(word: str, cut: int, inserted: str, form: str, value: str) -> str:
    """A secret word as text may hide it: a character inside it, letters in fullwidth forms, a letter
    percent-encoded; then perhaps a value assigned to it."""
    if form == "wide":
        word = "".join(chr(ord(c) + 0xFEE0) if c.isalpha() else c for c in word)
    cut = cut % len(word)
    if form == "percent":
        word = word[:cut] + f"%{ord(word[cut]):02x}" + word[cut + 1:]
    return word[:cut] + inserted + word[cut:] + value


json_texts = st.one_of(
    st.lists(st.sampled_from([*"ab _-.:=@/{}[]\"'\\\n\té€𝐀", "word", "eyJ", "://", r"\u0074", "Bearer ", "PRIVATE KEY",
                              "eyJhbGci.eyJzdWIi.c2ln", "db://u:pw@h", "-----BEGIN PRIVATE KEY-----x"]),
             max_size=6).map("".join),
    st.builds(_disguised, st.sampled_from(["token", "api_key", "pin", "passwd", "secret", "cookie"]),
              st.integers(min_value=0, max_value=8), st.sampled_from(["", "\n", "\t", "\\", '"', "é", " ", "_", "\x7f"]),
              st.sampled_from(["plain", "wide", "percent"]), st.sampled_from(["", "=sk-12345", ": hunter2!"])),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1), json_texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(json_texts, inner, max_size=3),
                            inner.map(lambda v: json.dumps(v, ensure_ascii=False))),
    max_leaves=8,
)


@settings(PROPERTY, max_examples=1000)
@given(value=st.fixed_dictionaries({"arguments": st.dictionaries(json_texts, json_values, max_size=3)},
                                   optional={"intent": json_texts, "input": json_values}))
def test_the_cheap_whole_record_check_never_skips_a_redaction(value):
    """`record` and `value` skip the walk when a pre-check of the whole value finds nothing: the walk must agree."""
    redactor = Redactor()
    if redactor._nothing_to_redact(value):
        walked: list[str] = []
        redactor._walk(value, "", walked, 0)
        assert walked == [], (value, walked)
        assert redactor.value(value) == (value, []) and "redacted" not in redactor.record(value)


# -- through a real sidecar: every field of every record kind and every span -----------------------------


SECRET_ARGUMENTS = {
    "to": "cfo@example.com",
    "items": [{"Password": "PLANT-1"}, {"ok": 1}],
    "headers": {"X-Api-Key": "PLANT-2", "Authorization": "Bearer PLANT-3"},
    "url": "https://user:PLANT-4@example.org/x?access_token=PLANT-5",
    "body": json.dumps({"client_secret": "PLANT-6", "data": [1, 2]}),
    "config": "password=PLANT-7",
    "x_api_key": "PLANT-8",
    "API-Key": "PLANT-9",
    "nested": {"deep": [[{"session_id": "PLANT-10"}]]},
    "pem": "-----BEGIN PRIVATE KEY-----\nPLANT-11\n-----END PRIVATE KEY-----",
}


@pytest.fixture
def receiver():
    rx = OtlpReceiver().start()
    yield rx
    rx.stop()


async def test_no_planted_secret_reaches_any_record_or_span(tmp_path, running_sidecar, receiver, monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    config = make_config(tmp_path, **{"evidence.arguments": "clear", "evidence.checkpoint_every": 5,
                                      "escalation.ttl_seconds": 1.0})
    config.telemetry.exporter = "otlp"
    config.telemetry.endpoint = receiver.endpoint
    config.telemetry.max_backoff_seconds = 0.3
    sidecar = await running_sidecar(config)
    address = sidecar.addresses[0]
    async with AsyncClient(address) as agent, ApprovalsClient(address) as approvals:
        allowed = await agent.authorize("search_docs", {"query": "x"}, signals={"api_key": "sk-TWO", "risk_score": 0.1})
        assert allowed.outcome == "allow"
        approved = await agent.authorize(
            "send_email", SECRET_ARGUMENTS, task_id="t api_key=PLANT-12", intent="use token: PLANT-13",
            call_id="call password=PLANT-14", signals={"nested": [{"Cookie": "PLANT-15"}]},
        )
        await approvals.approve(approved.escalation_id, note="password: PLANT-16", approver=ALICE)
        retry = await agent.authorize("send_email", SECRET_ARGUMENTS, task_id="t api_key=PLANT-12",
                                      intent="use token: PLANT-13", escalation_id=approved.escalation_id)
        assert retry.outcome == "allow", retry.reasons
        async with grpc.aio.insecure_channel(address) as channel:  # the task ends: a task_end record and span
            ended = await sidecar_pb2_grpc.ToolGateStub(channel).EndTask(
                sidecar_pb2.EndTaskRequest(task_id="t api_key=PLANT-12"),
                metadata=(("traceparent", "00-PLANT-25-x"), ("authorization", "Bearer PLANT-26")),
            )
        assert ended.evidence_seq > 0
        denied = await agent.authorize("delete_repo", {"token": "PLANT-17"}, intent="Authorization: Bearer PLANT-18")
        await approvals.deny(denied.escalation_id, note="no, secret=PLANT-19", approver=BOB)
        expiring = await agent.authorize("wire_money", {"amount": 1, "pin": "PLANT-22"}, intent="api-key PLANT-23 x-api-key=PLANT-24")
        assert expiring.outcome == "escalate"
        async with grpc.aio.insecure_channel(address) as channel:  # headers: metadata the caller sends
            await sidecar_pb2_grpc.ToolGateStub(channel).Authorize(
                build_request("search_docs", {"q": "x"}),
                metadata=(("authorization", "Bearer PLANT-20"), ("x-api-key", "PLANT-21"),
                          ("traceparent", "00-PLANT-21-x")),
            )
        deadline = time.monotonic() + 60  # the sweeper expires it after escalation.ttl_seconds
        while not any(r["kind"] == "expiry" for r in records(tmp_path / "evidence")):
            assert time.monotonic() < deadline, "the sweeper never expired the escalation"
            await asyncio.sleep(0.1)
    await sidecar.stop(grace=0)

    evidence = tmp_path / "evidence"
    written = records(evidence)
    kinds = {r["kind"] for r in written}
    assert kinds >= {"startup", "decision", "escalation", "approval", "human_denial", "expiry", "task_end",
                     "checkpoint"}, kinds
    assert kinds <= set(KINDS)
    for record in written:  # every field of every record kind
        assert not leaks(record), (record["kind"], leaks(record))
    assert b"sk-TWO" not in b"".join(p.read_bytes() for p in evidence.iterdir() if p.is_file())
    mirror = default_mirror_path(evidence).read_bytes()
    assert b"PLANT-" not in mirror and b"sk-TWO" not in mirror
    raw = b"".join(p.read_bytes() for p in evidence.glob("evidence-*.jsonl"))
    assert b"PLANT-" not in raw
    # what was redacted says so, and what is not secret is kept
    call = next(r for r in written if r["kind"] == "decision" and r.get("escalation_id") == approved.escalation_id
                and r["outcome"] == "escalate")
    assert call["arguments"]["to"] == "cfo@example.com" and call["arguments"]["items"][1] == {"ok": 1}
    assert "arguments.items[0].Password" in call["redacted"] and "intent" in call["redacted"]
    assert verify_dir(evidence).ok
    # the escalation store (and so the webhook and approvers) keeps ids, intent, notes and previews redacted too
    store = b"".join(p.read_bytes() for p in tmp_path.glob("escalations.db*"))
    assert b"send_email" in store
    assert not [n for n in range(1, 27) if re.search(rb"PLANT-%d(?![0-9])" % n, store)]
    (task_end,) = [r for r in written if r["kind"] == "task_end"]
    assert task_end["task_id"] == call["task_id"] == "t api_key=[REDACTED]"  # one rule set: the same id everywhere

    receiver.wait_for(lambda r: {"sidecar.expiry", "sidecar.task_end"} <= {s.name for s in r.spans}, timeout=15)
    with receiver.lock:
        spans = list(receiver.spans)
    assert {s.name.split(" ")[0] for s in spans} >= {"execute_tool", "run_guardrail", "sidecar.escalation",
                                                      "sidecar.approval", "sidecar.task_end", "evidence.checkpoint"}
    for span in spans:  # every span attribute and event attribute
        for value in (span.name, span.attributes, span.resource, [list(e) for e in span.events]):
            assert not leaks(value) and "sk-TWO" not in json.dumps(value), (span.name, value)
