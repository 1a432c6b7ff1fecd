"""The escalation: and console: config sections: defaults and clear errors naming the key."""

from __future__ import annotations

import pytest

from sidecar.config import ConfigError, load_config
from sidecar.escalation.service import approver_matches


def test_defaults():
    config = load_config(None)
    esc = config.escalation
    assert (esc.store, esc.path, esc.ttl_seconds, esc.use_window_seconds) == ("sqlite", "", 900.0, 300.0)
    assert esc.webhook_url == "" and esc.approvers == [] and esc.preview_arguments is True
    assert config.console.listen == "127.0.0.1:8080" and config.console.trusted_header == ""


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("escalation.store", "redis", "escalation.store: must be sqlite or postgres"),
        ("escalation.ttl_seconds", 0, "escalation.ttl_seconds: must be positive"),
        ("escalation.use_window_seconds", -1, "escalation.use_window_seconds: must be positive"),
        ("escalation.await_max_seconds", 0, "escalation.await_max_seconds: must be positive"),
        ("escalation.poll_interval_ms", 0, "escalation.poll_interval_ms: must be positive"),
        ("escalation.webhook_attempts", 0, "escalation.webhook_attempts: must be positive"),
        ("escalation.webhook_url", "ftp://x", "escalation.webhook_url: must be an http:// or https:// URL"),
        ("escalation.approvers", ["alice"], "escalation.approvers[0]: 'alice' must be a SPIFFE ID or scheme:value"),
        ("escalation.approvers", ["spiffe://Bad/x"], "escalation.approvers[0]: trust domain may hold only"),
        ("escalation.console_identities", ["spiffe://x y"], "escalation.console_identities[0]"),
        ("escalation.ttl_seconds", "soon", "escalation.ttl_seconds: must be a number"),
        ("escalation.colour", "blue", "escalation.colour: unknown key"),
        ("console.listen", "8080", "console.listen: must be host:port"),
        ("console.trusted_header", "X Email", "console.trusted_header: 'X Email' is not an HTTP header name"),
        ("console.jaeger_url", "jaeger", "console.jaeger_url: must be an http:// or https:// URL"),
        ("console.approver_prefix", "email", "console.approver_prefix: 'email' must start an identity"),
        ("console.dev_approver", "email:*", "console.dev_approver: must be one identity"),
        ("console.history_limit", 0, "console.history_limit: must be positive"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, {key: value})
    assert message in str(info.value)


def test_postgres_store_may_take_its_connection_from_the_environment():
    config = load_config(None, {"escalation.store": "postgres", "escalation.path": ""})
    assert config.escalation.dsn == ""


@pytest.mark.parametrize(
    "identity, patterns, expected",
    [
        ("spiffe://example.org/humans/alice", ["spiffe://example.org/humans/*"], True),
        ("spiffe://example.org/humansx", ["spiffe://example.org/humans/*"], False),
        ("email:alice@example.org", ["email:*@example.org"], True),
        ("email:alice@example.org.evil", ["email:*@example.org"], False),
        ("email:alice@example.org", ["email:alice@example.org"], True),
        ("email:a.ice@example.org", ["email:alice@example.org"], False),
    ],
)
def test_approver_patterns(identity, patterns, expected):
    assert approver_matches(identity, patterns) is expected
