"""ToolGate.Invoke: an argument put into the URL's path stays inside its one path segment.

`{name}` in an HTTP tool's URL takes the URL-quoted argument. Quoting turns `/` into `%2F`, but
`.` and `..` are unreserved and stay as they are, and an HTTP client (yarl, under aiohttp)
resolves dot segments, even percent-encoded ones (`%2E%2E`), before the request leaves: an
argument `..` would send `POST /api/projects/../issues` as `POST /api/issues`, an endpoint the
configured URL never named, while policy, the approver and the evidence saw a project called
`..`. Such a call is not made (`not_called`, `invalid_arguments`) and is recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.evidence.verify import verify_dir
from sidecar.v1 import sidecar_pb2
from tests.conftest import write_policy
from tests.infra.http import serve_app
from tests.infra.invoke import invoke, records

POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "deny", "reasons": ["too_wide: never forced"], "obligations": {}} if {
        input.tool.arguments.force == true
    } else := {"outcome": "allow", "reasons": ["ok: tickets"], "obligations": {}} if {
        startswith(input.tool.name, "t_")
    }
"""
SEARCH_SCHEMA = {
    "type": "object",
    "properties": {"q": {"type": "string"}, "force": {"type": "boolean", "default": False},
                   "limit": {"type": "integer", "default": 10}},
    "required": ["q"],
}


@pytest.fixture
async def upstream():
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    async with serve_app(app) as base:
        yield seen, base


@pytest.fixture
async def sidecar(tmp_path, sidecar_config, running_sidecar, upstream):
    seen, base = upstream
    tool = {"method": "POST", "timeout_seconds": 5}
    config = sidecar_config(**{
        "policy.dir": str(write_policy(tmp_path / "policy", POLICY)),
        "listen.unix": "",
        "invoke.tools": {
            "t_create": {**tool, "url": base + "/api/projects/{project}/issues"},
            "t_nested": {**tool, "url": base + "/api/v1/orgs/{org}/projects/{project}/issues"},
            "t_get": {**tool, "method": "GET", "url": base + "/api/items/{item}"},
            "t_suffix": {**tool, "url": base + "/api/files/{name}.json"},
            "t_query": {**tool, "method": "GET", "url": base + "/api/search?q={q}"},
            "t_fixed": {**tool, "method": "GET", "url": base + "/api/search?mode=safe&q={q}"},
            "t_fixed_post": {**tool, "url": base + "/api/reports?format=pdf"},
            "t_twice": {**tool, "url": base + "/api/items/{item}/copy/{item}"},
            "t_schema": {**tool, "method": "GET", "url": base + "/api/find", "input_schema": SEARCH_SCHEMA},
        },
    })
    return await running_sidecar(config), seen, config


def invocations(directory: str) -> list[dict]:
    return [r for r in records(directory) if r["kind"] == "invocation"]


ESCAPES = [
    ("t_create", {"project": ".."}),  # /api/issues
    ("t_create", {"project": "."}),  # /api/projects/issues
    ("t_create", {"project": ""}),  # /api/projects//issues: an empty segment, merged away by many servers
    ("t_nested", {"org": "..", "project": ".."}),  # two levels up: /api/v1/issues
    ("t_nested", {"org": "acme", "project": ".."}),
    ("t_get", {"item": ".."}),  # a GET: the rest goes in the query, the path still escapes
    # one segment to the client, but servers and proxies that decode %2F / %5C before routing (nginx
    # normalizing a URI it proxies, IIS) see separators again, and resolve what stands between them
    ("t_create", {"project": "../admin"}),  # /api/projects/../admin/issues: /api/admin/issues
    ("t_create", {"project": "..\\admin"}),  # a backslash is a slash to IIS
    ("t_create", {"project": "a/./b"}),
    ("t_create", {"project": "a//b"}),  # merged slashes
    ("t_create", {"project": "/etc"}),  # /api/projects//etc/issues
    ("t_suffix", {"name": "../../secrets"}),  # /api/files/../../secrets.json
]


@pytest.mark.parametrize("tool, arguments", ESCAPES, ids=[f"{t}-{json.dumps(a)}" for t, a in ESCAPES])
async def test_a_dot_segment_argument_is_not_sent_and_is_recorded(sidecar, tool, arguments):
    running, seen, config = sidecar
    response = await invoke(running.addresses[0], tool, {**arguments, "title": "x"})
    assert response.decision.outcome == sidecar_pb2.OUTCOME_ALLOW  # policy allowed the call it saw
    assert response.status == "not_called", response
    assert response.error.startswith("invalid_arguments:") and "path segment" in response.error
    assert seen == []  # no request left the sidecar
    (invocation,) = invocations(config.evidence.dir)
    assert invocation["status"] == "not_called" and invocation["arguments_digest"] == ""
    assert verify_dir(Path(config.evidence.dir)).ok


ARRIVES = [
    # (tool, arguments, the raw path the upstream must see)
    ("t_create", {"project": "..."}, "/api/projects/.../issues"),  # not a dot segment
    ("t_create", {"project": "..a"}, "/api/projects/..a/issues"),
    ("t_create", {"project": "%2e%2e"}, "/api/projects/%252e%252e/issues"),  # quoted: the text, not a dot segment
    ("t_create", {"project": "group/project"}, "/api/projects/group%2Fproject/issues"),  # one segment (GitLab ids)
    ("t_create", {"project": "a/.b"}, "/api/projects/a%2F.b/issues"),  # no dot segment, decoded or not
    ("t_suffix", {"name": "."}, "/api/files/..json"),  # part of a segment
    ("t_suffix", {"name": ".."}, "/api/files/...json"),
    ("t_query", {"q": ".."}, "/api/search?q=.."),  # in the query: no path meaning
    ("t_query", {"q": ""}, "/api/search?q="),
    # URL text no other value is written as, and values themselves (the URL-text rule below)
    ("t_get", {"item": "x", "flag": True}, "/api/items/x?flag=true"),  # the value itself
    ("t_get", {"item": 5, "ids": [1, 2]}, "/api/items/5?ids=%5B1,2%5D"),
    ("t_get", {"item": "x", "id": "9007199254740993"}, "/api/items/x?id=9007199254740993"),  # no number carries it
    ("t_get", {"item": "x", "v": "1.0"}, "/api/items/x?v=1.0"),  # 1.0 is decided as 1, sent as `1`
    ("t_get", {"item": "x", "w": "[1, 2]"}, "/api/items/x?w=%5B1,+2%5D"),  # [1,2] is sent without the space
    ("t_get", {"item": "007"}, "/api/items/007"),  # not JSON
    ("t_create", {"project": "p", "force": "true"}, "/api/projects/p/issues"),  # a JSON body keeps the string
]


@pytest.mark.parametrize("tool, arguments, path", ARRIVES, ids=[f"{t}-{json.dumps(a)}" for t, a, _ in ARRIVES])
async def test_other_values_reach_the_segment_the_url_names(sidecar, tool, arguments, path):
    running, seen, _ = sidecar
    response = await invoke(running.addresses[0], tool, arguments)
    assert response.status == "ok", response
    assert seen == [path]


# Found by the redteam review: an argument named like a query parameter the configured URL fixes was
# sent as a second one (`?mode=safe&mode=admin`). Servers read a repeated parameter differently (the
# first: aiohttp, Flask, Go; the last: Django, PHP; Rails merges body parameters over the query), so
# the tool could run with the agent's value in place of the operator's. Such a call is not made.
SHADOWS = [
    ("t_fixed", {"q": "x", "mode": "admin"}),
    ("t_fixed", {"q": "x", "MODE": "admin"}),  # ASP.NET reads query keys without case
    ("t_fixed_post", {"title": "q3", "format": "html"}),  # in the JSON body: merged over the query by some
]


@pytest.mark.parametrize("tool, arguments", SHADOWS, ids=[f"{t}-{json.dumps(a)}" for t, a in SHADOWS])
async def test_an_argument_cannot_shadow_a_query_parameter_the_url_fixes(sidecar, tool, arguments):
    running, seen, config = sidecar
    response = await invoke(running.addresses[0], tool, arguments)
    assert response.decision.outcome == sidecar_pb2.OUTCOME_ALLOW
    assert response.status == "not_called", response
    assert response.error.startswith("invalid_arguments:") and "query parameter" in response.error, response.error
    assert seen == []
    (invocation,) = invocations(config.evidence.dir)
    assert invocation["status"] == "not_called"
    assert verify_dir(Path(config.evidence.dir)).ok


async def test_other_arguments_join_the_fixed_query_and_a_placeholder_may_repeat(sidecar):
    running, seen, _ = sidecar
    response = await invoke(running.addresses[0], "t_fixed", {"q": "x", "page": 2})
    assert response.status == "ok", response
    twice = await invoke(running.addresses[0], "t_twice", {"item": "a b", "note": "n"})
    assert twice.status == "ok", twice  # was invoker_error: the second {item} found the argument taken
    assert seen == ["/api/search?mode=safe&q=x&page=2", "/api/items/a%20b/copy/a%20b"]


# The URL carries text: the boolean true and the string "true" both arrive as `true`, 5 and "5" as `5`.
# Policy tells them apart (a rule denying `force == true` let "true" through), the tool cannot: a
# string whose text is exactly how another value is written there is not sent.
SAME_TEXT = [
    # (tool, arguments, the argument refused)
    ("t_get", {"item": "5"}, "item"),  # a placeholder: /api/items/5 for 5 too
    ("t_create", {"project": "7", "title": "x"}, "project"),  # a placeholder of a POST
    ("t_get", {"item": "x", "force": "true"}, "force"),  # the query of a GET: force=true
    ("t_get", {"item": "x", "force": "false"}, "force"),
    ("t_get", {"item": "x", "owner": "null"}, "owner"),
    ("t_get", {"item": "x", "ids": "[1,2]"}, "ids"),  # a list goes as its JSON text
    ("t_get", {"item": "x", "filter": '{"a":1}'}, "filter"),
    ("t_query", {"q": "-2.5"}, "q"),
]


@pytest.mark.parametrize("tool, arguments, name", SAME_TEXT, ids=[f"{t}-{json.dumps(a)}" for t, a, _ in SAME_TEXT])
async def test_a_string_the_url_would_carry_as_another_value_is_not_sent(sidecar, tool, arguments, name):
    running, seen, config = sidecar
    response = await invoke(running.addresses[0], tool, arguments)
    assert response.decision.outcome == sidecar_pb2.OUTCOME_ALLOW
    assert response.status == "not_called", response
    assert response.error.startswith(f"invalid_arguments: arguments.{name} is a string whose text"), response.error
    assert seen == []
    (invocation,) = invocations(config.evidence.dir)
    assert invocation["status"] == "not_called" and invocation["reasons"] == [response.error]
    assert verify_dir(Path(config.evidence.dir)).ok


# A tool's framework reads URL text its own way (FastAPI takes `?force=yes` for true) and runs a left-out
# argument with its own default: with the tool's input_schema configured, calls are judged by it before
# policy, as the MCP gateway judges an upstream tool's (sidecar/invoke/schemas.py).
SCHEMA_REFUSED = [
    ({"q": "x", "force": "yes"}, "arguments.force"),  # policy would not see force == true; the tool would
    ({"q": "x", "force": 1}, "arguments.force"),
    ({"q": "x", "limit": "5"}, "arguments.limit"),
    ({"q": "x", "limit": 2.5}, "arguments.limit"),
    ({"limit": 5}, "arguments"),  # q is required
]


@pytest.mark.parametrize("arguments, field", SCHEMA_REFUSED, ids=[json.dumps(a) for a, _ in SCHEMA_REFUSED])
async def test_arguments_against_the_tools_input_schema_are_denied_before_policy(sidecar, arguments, field):
    running, seen, config = sidecar
    response = await invoke(running.addresses[0], "t_schema", arguments)
    assert response.decision.outcome == sidecar_pb2.OUTCOME_DENY and response.status == "", response
    assert response.decision.reasons[0].startswith(f"invalid_arguments: {field} does not match"), response
    assert seen == []
    (decision,) = [r for r in records(config.evidence.dir) if r["kind"] == "decision"]
    assert decision["outcome"] == "deny" and decision["reasons"] == list(response.decision.reasons)
    assert verify_dir(Path(config.evidence.dir)).ok


async def test_the_schemas_defaults_are_decided_on_and_sent(sidecar):
    from sidecar.canonical import canonical_json, sha256_digest

    running, seen, config = sidecar
    left_out = await invoke(running.addresses[0], "t_schema", {"q": "x"})
    assert left_out.status == "ok", left_out
    decided = {"q": "x", "force": False, "limit": 10}
    assert left_out.decision.arguments_digest == sha256_digest(canonical_json(decided))
    forced = await invoke(running.addresses[0], "t_schema", {"q": "x", "force": True})
    assert forced.decision.reasons == ["too_wide: never forced"]
    numeric = await invoke(running.addresses[0], "t_schema", {"q": "5"})
    assert numeric.status == "ok", numeric  # its schema says q is a string: "5" is no other value here
    assert seen == ["/api/find?q=x&force=false&limit=10", "/api/find?q=5&force=false&limit=10"]
    assert invocations(config.evidence.dir)[0]["arguments_digest"] == left_out.decision.arguments_digest


def test_an_input_schema_that_is_not_json_schema_is_refused_at_load(sidecar_config):
    from sidecar.config import ConfigError

    tool = {"url": "http://127.0.0.1:9/api", "input_schema": {"type": "object", "properties": {"q": {"type": 5}}}}
    with pytest.raises(ConfigError, match=r"invoke\.tools\.t_bad\.input_schema: the tool's input schema is not valid"):
        sidecar_config(**{"invoke.tools": {"t_bad": tool}})
