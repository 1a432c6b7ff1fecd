"""Config loading, call checks: the small pieces the gate is built from."""

from __future__ import annotations

import pytest

from sidecar.calls import CallIdRegistry, ToolCall, check_call
from sidecar.config import ConfigError, load_config


def test_defaults_are_the_managed_opa_and_the_workload_api_not_dev():
    config = load_config(runs_sidecar=False)  # the defaults alone cannot serve: tests/test_core_config_default.py
    assert config.policy.opa.url == "" and config.policy.opa.binary == "opa"
    assert config.identity.sources == ["workload_api"] and not config.dev_mode
    assert config.policy.timeout_ms == 100 and config.policy.max_input_bytes == 1 << 20 and config.policy.max_depth == 64


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("policy: {timeout_ms: '100'}", "policy.timeout_ms: must be an integer"),
        ("policy: {reload: 1}", "policy.reload: must be true or false"),
        ("policy: {engine: embedded}", "policy.engine: unknown key"),
        ("policy: {opa: {url: 'ftp://x'}}", "policy.opa.url: must be an http:// or https:// URL"),
        ("policy: {opa: {url: 'unix://run/opa.sock'}}", "policy.opa.url: a unix socket is unix:// and an absolute path"),
        ("policy: {opa: {url: 'unix:/run/opa.sock'}}", "policy.opa.url: a unix socket is unix:// and an absolute path"),
        ("policy: {opa: {url: 'unix:///run/opa.sock?x=1'}}", "policy.opa.url: a unix socket is unix:// and an absolute path"),
        ("policy: {opa: {max_in_flight: 0}}", "policy.opa.max_in_flight: must be positive"),
        ("listen: {tcp: '', unix: ''}", "listen: at least one"),
        ("identity: {sources: [dev, mtls]}", "identity.sources: 'dev' cannot be combined"),
        ("identity: {sources: [kerberos]}", "identity.sources: unknown source 'kerberos'"),
        ("usage: {window: 5}", "usage.window: unknown key"),
        ("- a list", "top level must be a mapping"),
        ("policy: [1]", "policy: must be a mapping"),
    ],
)
def test_bad_config_names_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(path)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")


def test_call_ids_are_bound_to_one_call():
    registry = CallIdRegistry(capacity=2)
    assert registry.claim("c1", "f1") and registry.claim("c1", "f1")
    assert not registry.claim("c1", "f2")


@pytest.mark.parametrize(
    "call, code",
    [
        (ToolCall("", {}), "invalid_tool"),
        (ToolCall("t" * 257, {}), "invalid_tool"),
        (ToolCall("a\x00b", {}), "invalid_tool"),
        (ToolCall("t", [1]), "invalid_arguments"),
        (ToolCall("t", {"x": float("nan")}), "invalid_arguments"),
        (ToolCall("t", {}, signals=[1]), "invalid_signals"),
        (ToolCall("t", {}, intent="i" * 5000), "invalid_intent"),
        (ToolCall("t", {"x": "y" * 200}), "input_too_large"),
    ],
)
def test_call_checks_explain_what_is_wrong(call, code):
    problems, digest = check_call(call, max_bytes=100, max_depth=8)
    assert any(p.startswith(code + ":") for p in problems), problems
    assert digest.startswith("sha256:")


def test_a_good_call_has_no_problems_and_a_stable_digest():
    first = check_call(ToolCall("t", {"b": 1, "a": [1, 2]}), max_bytes=100, max_depth=8)
    second = check_call(ToolCall("t", {"a": [1, 2], "b": 1}), max_bytes=100, max_depth=8)
    assert first == second and first[0] == []
