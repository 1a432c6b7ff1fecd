"""Reason codes (sidecar/reasons.py): the wire form of a Reason, parsing one back, and the docs' table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sidecar import reasons
from sidecar.evidence.records import reason_code
from sidecar.reasons import POLICY_TIMEOUT, Reason, parse

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
CODES = {value for name, value in vars(reasons).items() if name.isupper() and isinstance(value, str)}


def documented_codes() -> set[str]:
    """The codes in the first column of docs/api.md's table "Reason codes the sidecar itself gives"."""
    text = API_MD.read_text()
    start = text.index("Reason codes the sidecar itself gives")
    table = text[start:].split("\n\n")[1]  # the paragraph after the sentence is the table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows, "the reason-code table has rows"
    firsts = [row.split(" | ")[0] for row in rows]
    return {code for cell in firsts for code in re.findall(r"`([a-z][a-z0-9_]*)`", cell)}


def test_every_code_is_documented_and_every_documented_code_exists():
    documented = documented_codes()
    assert sorted(CODES - documented) == [], "codes in sidecar/reasons.py missing from docs/api.md's table"
    assert sorted(documented - CODES) == [], "codes in docs/api.md's table that sidecar/reasons.py does not have"


def test_each_constant_is_named_after_its_code():
    for name, value in vars(reasons).items():
        if name.isupper() and isinstance(value, str):
            assert value == name.lower() and re.fullmatch(r"[a-z][a-z0-9_]*", value), name


def test_the_wire_form_is_code_colon_space_text():
    assert str(Reason(POLICY_TIMEOUT, "OPA at unix:///x.sock did not answer within 100 ms")) == (
        "policy_timeout: OPA at unix:///x.sock did not answer within 100 ms"
    )


@pytest.mark.parametrize(
    "reason, parsed",
    [
        ("policy_timeout: OPA did not answer", Reason("policy_timeout", "OPA did not answer")),
        # only the first ": " ends the code; the text may hold more (an OPA error, a path, a note)
        ("policy_error: OPA answered 500: conflict: a: b", Reason("policy_error", "OPA answered 500: conflict: a: b")),
        ("escalation_denied: denied by bob: not now", Reason("escalation_denied", "denied by bob: not now")),
        ("overloaded: ", Reason("overloaded", "")),  # empty text
        ("  granted: padded", Reason("granted", "padded")),  # the code is stripped
    ],
)
def test_parse_splits_at_the_first_separator(reason, parsed):
    assert parse(reason) == parsed


@pytest.mark.parametrize("text", ["", "x", "a: b: c", ": leading", "ends with colon:"])
def test_str_and_parse_round_trip(text):
    reason = Reason(POLICY_TIMEOUT, text)
    assert parse(str(reason)) == reason


@pytest.mark.parametrize(
    "reason",
    [
        "policy_timeout",  # a code with no text: not the wire form
        "policy_timeout:",  # no space after the colon
        "no rule allows this call",  # policy may give reasons without a code
        "no rule: allows this call",  # a space in what precedes ": "
        ": no code",
        "x" * 65 + ": too long for a code",
        "",
    ],
)
def test_parse_finds_no_code(reason):
    assert parse(reason) is None
    assert reason_code(reason) == "other"


def test_reason_code_is_the_parsed_code():
    assert reason_code("approval_used: the approval was already used: once") == "approval_used"
    assert reason_code("x" * 64 + ": longest code") == "x" * 64
