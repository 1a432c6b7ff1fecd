"""The mcp and invoke config sections: docs/mcp.md's examples load, and bad settings name their key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sidecar.config import ConfigError, load_config
from sidecar.invoke.obligations import ObligationError, apply_obligations
from sidecar.mcp import names
from tests.conftest import REPO


# What the rest of a pod's config says (the sections docs/mcp.md's fragments leave out), outside dev mode.
POD = {"listen.unix": "/run/agent-sidecar/sidecar.sock", "escalation.approvers": ["email:*@example.org"]}


def test_the_yaml_examples_in_docs_mcp_load(tmp_path):
    text = (REPO / "docs" / "mcp.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL) if b.startswith(("mcp:", "invoke:"))]
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(block)
        config = load_config(path, POD)
        assert config.mcp.upstreams or config.invoke.tools
    config = load_config(tmp_path / "example0.yaml", POD)
    assert config.mcp.upstreams["docs"].credential.kind == "jwt_svid"
    assert config.mcp.upstreams["notes"].command == ["python", "-m", "notes_server"]


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"mcp.upstreams": {"Docs_1": {"url": "https://x/mcp"}}}, "mcp.upstreams.Docs_1"),
        ({"mcp.upstreams": {"a__b": {"url": "https://x/mcp"}}}, "mcp.upstreams.a__b"),
        ({"mcp.upstreams": {"docs": {"url": "https://x/mcp", "command": ["x"]}}}, "mcp.upstreams.docs"),
        ({"mcp.upstreams": {"docs": {}}}, "mcp.upstreams.docs"),
        ({"mcp.upstreams": {"docs": {"url": "ftp://x"}}}, "mcp.upstreams.docs.url"),
        ({"mcp.upstreams": {"docs": {"url": "https://x", "credential": {"kind": "jwt_svid"}}}},
         "mcp.upstreams.docs.credential.audience"),
        ({"mcp.upstreams": {"docs": {"url": "https://x", "credential": {"kind": "password"}}}},
         "mcp.upstreams.docs.credential.kind"),
        ({"mcp.upstreams": {"docs": {"command": ["x"], "credential": {"kind": "secret_file", "file": "/s"}}}},
         "mcp.upstreams.docs.credential"),
        ({"mcp.upstreams": {"docs": {"url": "https://x", "typo": 1}}}, "mcp.upstreams.docs.typo"),
        ({"mcp.upstreams": {"docs": {"command": "python server.py"}}}, "mcp.upstreams.docs.command"),
        ({"mcp.listen": "8765"}, "mcp.listen"),
        ({"mcp.listen": "0.0.0.0:8765", "identity.sources": ["jwt_svid"], "identity.jwt_audience": "a",
          "identity.delegation_audience": "b", "escalation.approvers": ["email:*@example.org"]}, "mcp.listen"),
        ({"invoke.tools": {"t": {"url": "https://x/{a}", "method": "TRACE"}}}, "invoke.tools.t.method"),
        ({"invoke.tools": {"t": {"url": "https://x", "credential": {"kind": "secret_file"}}}}, "invoke.tools.t.credential.file"),
        ({"invoke.tools": {"t": {"url": "https://x", "headers": {"a": 1}}}}, "invoke.tools.t.headers.a"),
        # the operator names where a tool's calls go, never the agent: no placeholder before the path
        *(({"invoke.tools": {"t": {"url": url}}}, "invoke.tools.t.url: a placeholder in the scheme, host or port")
          for url in ("https://{host}/a", "https://{tenant}.tools.example/a", "https://tools.example:{port}/a",
                      "https://{user}@tools.example/a", "http://127.0.0.1{x}/a")),
        ({"invoke.tools": {"t": {"url": "{scheme}://tools.example/a"}}}, "invoke.tools.t.url: must be an http://"),
        ({"invoke.tools": {"t": {"url": "https://[::1{x}]/a"}}}, "invoke.tools.t.url: not a valid URL"),
    ],
)
def test_bad_settings_name_their_key(settings, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, settings)
    assert str(info.value).startswith(key), str(info.value)


def test_with_mtls_the_gateway_may_take_bearer_tokens_off_loopback_and_mtls_may_serve_only_there():
    """With mtls among the sources the gateway serves HTTPS with mutual TLS (docs/mcp.md#identity)."""
    tokens = {"identity.jwt_audience": "a", "identity.delegation_audience": "b",
              "escalation.approvers": ["email:*@example.org"]}
    config = load_config(None, {"mcp.listen": "0.0.0.0:8765", "identity.sources": ["jwt_svid", "mtls"], **tokens})
    assert config.mcp.listen == "0.0.0.0:8765"
    only_gateway = load_config(None, {"identity.sources": ["mtls"], "listen.tcp": "", "listen.unix": "/tmp/x.sock",
                                      "mcp.listen": "0.0.0.0:8765", "escalation.approvers": ["email:*@example.org"]})
    assert only_gateway.identity.sources == ["mtls"] and not only_gateway.listen.tcp


def test_exposed_names_split_unambiguously_and_impostors_are_refused():
    upstreams = ["docs", "notes"]
    assert names.split_name(names.exposed_name("notes", "search")) == ("notes", "search")
    assert names.split_name("notes__a__b") == ("notes", "a__b")
    assert names.split_name("search") is None
    assert names.refusal("notes", "docs__search", upstreams)  # looks like docs's tool
    assert names.refusal("notes", "notes__x", upstreams)
    assert names.refusal("notes", "bad name", upstreams)
    assert names.refusal("notes", "x" * 124, upstreams)  # notes__ + 124 > 128
    assert names.refusal("notes", "a__b", upstreams) is None  # not an upstream's prefix
    assert names.refusal("notes", "search", upstreams) is None


@pytest.mark.parametrize(
    "obligations, problem",
    [
        ({"frobnicate": True}, "obligation_unknown"),
        ({"drop_arguments": "x"}, "obligation_unknown"),
        ({"clamp_arguments": {"n": "10"}}, "obligation_unknown"),
        ({"clamp_arguments": {"n": True}}, "obligation_unknown"),
        ({"cap_list_arguments": {"l": -1}}, "obligation_unknown"),
        ({"cap_list_arguments": {"l": 1.5}}, "obligation_unknown"),
        ({"clamp_arguments": {"s": 5}}, "obligation_inapplicable"),
        ({"clamp_arguments": {"b": 0}}, "obligation_inapplicable"),  # a boolean is not a number here
        ({"cap_list_arguments": {"s": 1}}, "obligation_inapplicable"),
    ],
)
def test_obligations_that_cannot_be_applied_fail_closed(obligations, problem):
    with pytest.raises(ObligationError) as info:
        apply_obligations({"n": 50, "s": "text", "b": True, "l": [1, 2]}, obligations)
    assert info.value.reason.startswith(problem)


def test_obligations_change_only_what_they_name_and_say_so():
    arguments = {"n": 50, "m": 3, "l": [1, 2, 3], "keep": {"nested": 1}, "secret": "x", "gone": 1}
    sent, changes = apply_obligations(arguments, {
        "clamp_arguments": {"n": 10, "m": 10, "absent": 1}, "cap_list_arguments": {"l": 2},
        "redact_call_arguments": ["secret"], "drop_arguments": ["gone"], "record_arguments": True,
        "redact_arguments": ["keep"],
    })
    assert sent == {"n": 10, "m": 3, "l": [1, 2], "keep": {"nested": 1}, "secret": "[REDACTED]"}
    assert arguments["n"] == 50 and "gone" in arguments  # the original is untouched
    assert sorted(c["action"] for c in changes) == ["capped", "clamped", "dropped", "redacted"]
    assert yaml.safe_dump(changes)  # plain data, recordable


async def test_the_list_phase_input_matches_the_schema_and_says_list():
    import json as _json

    import jsonschema

    from sidecar.calls import CallIdRegistry
    from sidecar.gate import Gate
    from sidecar.identity import CallerIdentity, Subject
    from sidecar.policy import input as input_module
    from sidecar.policy.decision import Decision
    from sidecar.server import default_steps
    from sidecar.steps import AskPolicy
    from sidecar.usage.memory import MemoryCounter

    seen = []

    class Capturing:  # the policy step's DecisionClient and Catalog; answers allow and keeps the input document
        revision = "test"

        def entry(self, tool):
            return None

        async def decide(self, document):
            seen.append(document)
            return Decision("allow", ("ok: test",), {}, "test", "test")

        def ready(self):
            return True, "test"

        async def aclose(self):
            pass

    capturing = Capturing()
    ask = AskPolicy(decisions=capturing, catalog=capturing, usage=MemoryCounter(60, 100), instance_id="t")
    steps = default_steps(policy=ask, call_ids=CallIdRegistry(100), max_input_bytes=1 << 20, max_depth=64)
    gate = Gate(steps=steps, policy=ask, recorder=None, instance_id="t")
    decision = await gate.visible(CallerIdentity(Subject("spiffe://dev.local/agent", source="dev")), "read_file", "fs")
    assert decision.outcome == "allow"
    (document,) = seen
    schema = _json.loads((Path(input_module.__file__).parent / "input.schema.json").read_text())
    jsonschema.validate(document, schema, format_checker=jsonschema.FormatChecker())
    assert document["request"]["phase"] == "list" and document["tool"] == {
        "name": "read_file", "server": "fs", "arguments": {}, "catalog": None, "facts": {}}
    assert document["usage"] == {"calls_in_window": 1, "window_seconds": 60, "calls_in_task": 0}
    await gate.visible(CallerIdentity(Subject("spiffe://dev.local/agent", source="dev")), "read_file", "fs")
    assert seen[-1]["usage"]["calls_in_window"] == 1  # listing counts nothing
