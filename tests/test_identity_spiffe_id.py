"""Strict SPIFFE ID validation (sidecar/identity/spiffe_id.py) against the SPIFFE ID spec.

py-spiffe's SpiffeId lowercases, has no length limits and accepts a trailing
newline; these tests pin that ours does none of that.
"""

from __future__ import annotations

import pytest
from spiffe import SpiffeId

from sidecar.config import ConfigError, load_config
from sidecar.identity import Subject
from sidecar.identity.spiffe_id import (
    MAX_ID_BYTES,
    SpiffeIdError,
    parse_spiffe_id,
    validate_spiffe_id,
    validate_trust_domain,
    validate_workload_id,
)

GOOD = [
    "spiffe://example.org/agent",
    "spiffe://example.org/ns/agents/sa/planner",
    "spiffe://example.org",  # the trust domain's own ID is a valid SPIFFE ID
    "spiffe://a-b_c.d9/x.y-z_W",  # path segments may hold upper case, trust domains may not
    "spiffe://1.2.3.4/agent",
    "spiffe://example.org/..a/a..",  # dots inside a segment are fine
]


@pytest.mark.parametrize("value", GOOD)
def test_valid_ids(value):
    assert validate_spiffe_id(value) == value


BAD = {
    "upper-case scheme": "SPIFFE://example.org/agent",
    "upper-case trust domain": "spiffe://Example.org/agent",
    "empty": "",
    "other scheme": "https://example.org/agent",
    "no trust domain": "spiffe:///agent",
    "bare scheme": "spiffe://",
    "space in trust domain": "spiffe://exa mple.org/a",
    "port": "spiffe://example.org:8443/agent",
    "userinfo": "spiffe://user@example.org/agent",
    "query": "spiffe://example.org/agent?x=1",
    "fragment": "spiffe://example.org/agent#x",
    "percent-encoding": "spiffe://example.org/a%20b",
    "empty segment": "spiffe://example.org/a//b",
    "trailing slash": "spiffe://example.org/agent/",
    "dot segment": "spiffe://example.org/./agent",
    "dot-dot segment": "spiffe://example.org/a/..",
    "trailing newline": "spiffe://example.org/agent\n",
    "newline in trust domain": "spiffe://example.org\n/agent",
    "non-ascii path": "spiffe://example.org/agént",
    "non-ascii trust domain": "spiffe://exämple.org/agent",
    "NUL": "spiffe://example.org/a\x00b",
    "over-long id": "spiffe://example.org/" + "a" * (MAX_ID_BYTES - len("spiffe://example.org/") + 1),
    "over-long trust domain": "spiffe://" + "a" * 256 + "/agent",
    "backslash": "spiffe://example.org\\agent",
}


@pytest.mark.parametrize("value", list(BAD.values()), ids=list(BAD))
def test_invalid_ids(value):
    with pytest.raises(SpiffeIdError):
        validate_spiffe_id(value)


def test_py_spiffe_accepts_what_we_refuse():
    # The reason this module exists: these pass py-spiffe, fail here.
    for value in (BAD["upper-case trust domain"], BAD["trailing newline"], BAD["over-long id"]):
        SpiffeId(value)
        with pytest.raises(SpiffeIdError):
            validate_spiffe_id(value)


def test_length_limit_is_exact_and_in_bytes():
    prefix = "spiffe://example.org/"
    at_limit = prefix + "a" * (MAX_ID_BYTES - len(prefix))
    assert len(at_limit.encode()) == MAX_ID_BYTES
    validate_spiffe_id(at_limit)
    with pytest.raises(SpiffeIdError, match="longer than 2048 bytes"):
        validate_spiffe_id(at_limit + "a")
    assert validate_trust_domain("a" * 255)
    with pytest.raises(SpiffeIdError, match="255"):
        validate_trust_domain("a" * 256)


def test_non_strings_are_refused():
    for value in (None, 42, b"spiffe://example.org/a", ["spiffe://example.org/a"]):
        with pytest.raises(SpiffeIdError, match="must be a string"):
            validate_spiffe_id(value)


def test_parts():
    parts = parse_spiffe_id("spiffe://example.org/ns/a")
    assert (parts.trust_domain, parts.path) == ("example.org", "/ns/a")
    assert parse_spiffe_id("spiffe://example.org").path == ""


def test_workload_ids_need_a_path():
    assert validate_workload_id("spiffe://example.org/agent").path == "/agent"
    with pytest.raises(SpiffeIdError, match="only a trust domain"):
        validate_workload_id("spiffe://example.org")


@pytest.mark.parametrize("value", ["Example.org", "", "example.org\n", "exa mple", "a:1", "spiffe://example.org"])
def test_invalid_trust_domains(value):
    with pytest.raises(SpiffeIdError):
        validate_trust_domain(value)


def test_subject_exposes_parts_for_policy_input():
    subject = Subject("spiffe://example.org/ns/a", source="mtls", svid_expires_at="2026-01-01T00:00:00Z")
    assert subject.to_input() == {
        "spiffe_id": "spiffe://example.org/ns/a",
        "trust_domain": "example.org",
        "path": "/ns/a",
        "source": "mtls",
        "svid_expires_at": "2026-01-01T00:00:00Z",
    }


def test_config_refuses_bad_ids_and_trust_domains():
    with pytest.raises(ConfigError, match="identity.dev_spiffe_id"):
        load_config(None, {"identity.dev_spiffe_id": "spiffe://Dev.local/agent"})
    with pytest.raises(ConfigError, match=r"identity.trust_domains\[1\]"):
        load_config(None, {"identity.trust_domains": ["example.org", "Other.org"]})
