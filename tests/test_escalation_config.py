"""The escalation: and console: config sections: defaults and clear errors naming the key."""

from __future__ import annotations

import pytest

from sidecar.config import ConfigError, load_config
from sidecar.escalation.approvers import approver_matches


DEV = {"identity.sources": ["dev"]}  # dev mode only when a config asks for it


def test_defaults():
    config = load_config(None, runs_sidecar=False)  # the defaults as such (alone they cannot serve)
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
        ("escalation.webhook_backoff_seconds", 0, "escalation.webhook_backoff_seconds: must be positive"),
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


PROD = {"identity.sources": ["workload_api"], "listen.unix": "/tmp/x.sock"}  # outside dev mode
PEOPLE = ["email:*@example.org"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({}, "escalation.approvers: required outside dev mode"),
        ({"escalation.approvers": []}, "escalation.approvers: required outside dev mode"),
        ({"escalation.approvers": PEOPLE, "escalation.webhook_url": "https://hooks.example.org/x"},
         "escalation.webhook_secret_file: required with escalation.webhook_url outside dev mode"),
        ({"escalation.approvers": ["spiffe://example.org/humans/*"]},
         "escalation.approvers[0]: 'spiffe://example.org/humans/*': a workload (spiffe://) is named by its exact"),
        ({"escalation.approvers": PEOPLE, "escalation.console_identities": ["spiffe://example.org/consoles/*"]},
         "escalation.console_identities[0]"),
        ({"escalation.approvers": PEOPLE, "escalation.console_identities": ["email:console@example.org"]},
         "escalation.console_identities[0]: 'email:console@example.org' must be a console's SPIFFE ID"),
        ({"escalation.approvers": PEOPLE, "console.approver_prefix": ""}, "console.approver_prefix: '' must start"),
        ({"escalation.approvers": PEOPLE, "console.approver_prefix": "spiffe:"},
         "console.approver_prefix: must not be spiffe:"),
    ],
)
def test_outside_dev_mode_nothing_defaults_open(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, {**PROD, **overrides})
    assert message in str(info.value)


def test_dev_mode_keeps_its_conveniences_and_production_loads_when_explicit(tmp_path):
    dev = load_config(None, DEV)  # dev mode, asked for: anyone approves, webhook unsigned, console dev approver
    assert dev.dev_mode and dev.escalation.approvers == []
    load_config(None, {**DEV, "escalation.webhook_url": "https://hooks.example.org/x",
                       "console.dev_approver": "email:d@x.org"})
    assert not load_config(None, runs_sidecar=False).dev_mode  # the defaults are not dev mode
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    prod = load_config(None, {**PROD, "escalation.approvers": [*PEOPLE, "spiffe://example.org/ns/ops/sa/oncall-bot"],
                              "escalation.webhook_url": "https://hooks.example.org/x",
                              "escalation.webhook_secret_file": str(secret)})
    assert not prod.dev_mode


@pytest.mark.parametrize(
    "console, message",
    [
        ({"console.dev_approver": "email:dev@example.org", "console.trusted_header": "X-Email"},
         "console.dev_approver: only in dev mode"),
        ({}, "console.trusted_header: required outside dev mode"),
        ({"console.trusted_header": "X-Email"}, "console.token_file: required outside dev mode"),
    ],
)
def test_the_console_outside_dev_mode_needs_a_signed_in_person_and_its_own_identity(console, message):
    config = load_config(None, {**PROD, "escalation.approvers": PEOPLE, **console})
    with pytest.raises(ConfigError) as info:
        config.validate_console()
    assert message in str(info.value)
    # Through the console's own start-up too: it refuses before serving anything.
    from sidecar.console.app import app_from_config

    with pytest.raises(ConfigError):
        app_from_config(config)
    ok = load_config(None, {**PROD, "escalation.approvers": PEOPLE, "console.trusted_header": "X-Email",
                            "console.token_file": "/var/run/secrets/console/jwt"})
    ok.validate_console()
    load_config(None, {**DEV, "console.dev_approver": "email:dev@example.org"}).validate_console()


def test_postgres_store_may_take_its_connection_from_the_environment():
    config = load_config(None, {**PROD, "escalation.approvers": PEOPLE, "escalation.store": "postgres",
                                "escalation.path": ""})
    assert config.escalation.dsn == ""


@pytest.mark.parametrize(
    "identity, patterns, expected",
    [
        # A workload matches only its exact SPIFFE ID, never a pattern (config refuses spiffe patterns).
        ("spiffe://example.org/humans/alice", ["spiffe://example.org/humans/*"], False),
        ("spiffe://example.org/humans/alice", ["spiffe://example.org/humans/alice"], True),
        ("spiffe://example.org/humansx", ["spiffe://example.org/humans/*"], False),
        ("spiffe://example.org/ns/agents/sa/x", ["*"], False),
        ("spiffe://example.org/ns/agents/sa/x", ["spiffe:*"], False),
        ("email:alice@example.org", ["email:*@example.org"], True),
        ("email:alice@example.org.evil", ["email:*@example.org"], False),
        # `*` stands for characters of one mailbox, never another address before the domain
        ("email:eve@evil.org@example.org", ["email:*@example.org"], False),
        ("email:eve@evil.org,bob@example.org", ["email:*@example.org"], False),
        ("email:alice@mail.example.org", ["email:*@*.example.org"], True),
        ("email:alice@example.org", ["email:alice@example.org"], True),
        ("email:a.ice@example.org", ["email:alice@example.org"], False),
    ],
)
def test_approver_patterns(identity, patterns, expected):
    assert approver_matches(identity, patterns) is expected
