"""ToolGate.Invoke against a real HTTP server on loopback: allow → the sidecar makes the call with
the credential the agent never holds; deny / escalate → no call; upstream faults → clear errors,
all recorded as invocation records chained to their decisions. The call goes only where config
says (a `server` the caller names is refused) and only as policy's obligations shape it (another
spelling of an argument does not sidestep one)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import grpc
import pytest
from aiohttp import web

from sidecar.evidence.verify import verify_dir
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import write_policy
from tests.infra.http import serve_app
from tests.infra.invoke import invoke, records

SECRET = "ticket-api-key-91c2"

POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok: tickets"], "obligations": {"cap_list_arguments": {"labels": 1}}} if {
        input.tool.name in {"create_ticket", "slow_tool", "broken_tool", "huge_tool", "down_tool", "garbage_tool", "bigint_tool"}
        not input.tool.arguments.project == "secret-project"
    }

    decision := {"outcome": "escalate", "reasons": ["needs_approval: deletes"], "obligations": {}} if {
        input.tool.name == "delete_ticket"
    }
"""


class Upstream:
    def __init__(self) -> None:
        self.requests: list[dict] = []

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"path": request.path, "body": body, "authorization": request.headers.get("authorization", ""),
                              "api_key": request.headers.get("x-api-key", ""),
                              "traceparent": request.headers.get("traceparent", "")})
        return web.json_response({"id": 7, "title": body.get("title")}, status=201,
                                 headers={"x-rollback-token": "delete-ticket-7"})

    async def anything(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path})
        if request.path == "/slow":
            await asyncio.sleep(2)  # 4x slow_tool's 0.5 s timeout; the upstream's teardown waits this out
        if request.path == "/broken":
            return web.Response(status=503, text="maintenance")
        if request.path == "/huge":
            return web.Response(body=b"x" * 100_000, content_type="text/plain")
        if request.path == "/bigint":
            return web.Response(body=b'{"id": 1152921504606846977}', content_type="application/json")
        if request.path == "/garbage":
            return web.Response(body=b"{not json", content_type="application/json")
        return web.Response(text="?")


@pytest.fixture
async def upstream():
    state = Upstream()
    app = web.Application()
    app.router.add_post("/projects/{project}/tickets", state.create)
    app.router.add_route("*", "/{tail:.*}", state.anything)
    async with serve_app(app) as base:
        yield state, base


@pytest.fixture
async def sidecar(tmp_path, sidecar_config, running_sidecar, upstream):
    state, base = upstream
    secret = tmp_path / "ticket-key"
    secret.write_text(SECRET)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    tool = {"method": "POST", "timeout_seconds": 10, "max_response_bytes": 10_000}
    config = sidecar_config(**{
        "policy.dir": str(write_policy(tmp_path / "policy", POLICY)),
        "listen.unix": "",
        "invoke.tools": {
            "create_ticket": {**tool, "url": base + "/projects/{project}/tickets",
                              "credential": {"kind": "secret_file", "file": str(secret), "header": "X-Api-Key",
                                             "scheme": ""}},
            "delete_ticket": {**tool, "url": base + "/delete"},
            "slow_tool": {**tool, "url": base + "/slow", "timeout_seconds": 0.5},
            "broken_tool": {**tool, "url": base + "/broken"},
            "huge_tool": {**tool, "url": base + "/huge"},
            "garbage_tool": {**tool, "url": base + "/garbage"},
            "bigint_tool": {**tool, "url": base + "/bigint"},
            "down_tool": {**tool, "url": f"http://127.0.0.1:{dead}/x"},
        },
    })
    return await running_sidecar(config), state, config


async def test_allowed_call_is_made_by_the_sidecar_with_its_credential(sidecar):
    running, state, config = sidecar
    response = await invoke(running.addresses[0], "create_ticket",
                            {"project": "ops team/1", "title": "disk full", "labels": ["a", "b"]})
    assert response.decision.outcome == sidecar_pb2.OUTCOME_ALLOW
    assert response.status == "ok" and response.upstream_status == 201, response
    assert response.result["body"]["id"] == 7
    sent = state.requests[-1]
    assert sent["path"] == "/projects/ops team/1/tickets"  # URL-quoted into one path segment
    assert sent["body"] == {"title": "disk full", "labels": ["a"]}  # placeholder not repeated; list capped
    assert sent["api_key"] == SECRET and sent["authorization"] == ""  # attached by the sidecar, no scheme
    assert SECRET not in str(response)
    assert sent["traceparent"].split("-")[1] == response.decision.trace_id
    log = records(config.evidence.dir)
    decision = next(r for r in log if r["kind"] == "decision")
    invocation = next(r for r in log if r["kind"] == "invocation")
    assert invocation["decision_id"] == decision["decision_id"] and invocation["decision_hash"] == decision["hash"]
    assert invocation["rollback_token"] == "delete-ticket-7"
    assert invocation["credential_kind"] == "secret_file" and SECRET not in json.dumps(log)
    assert invocation["upstream_status"] == 201 and invocation["autonomy"] == "autonomous"
    assert verify_dir(Path(config.evidence.dir)).ok


@pytest.mark.parametrize(
    "tool, arguments, outcome",
    [
        ("create_ticket", {"project": "secret-project", "title": "x"}, sidecar_pb2.OUTCOME_DENY),
        ("delete_ticket", {"id": 7}, sidecar_pb2.OUTCOME_ESCALATE),
        ("not_configured", {}, sidecar_pb2.OUTCOME_DENY),
    ],
)
async def test_deny_and_escalate_make_no_call(sidecar, tool, arguments, outcome):
    running, state, config = sidecar
    response = await invoke(running.addresses[0], tool, arguments)
    assert response.decision.outcome == outcome
    assert response.status == "" and not state.requests
    assert not [r for r in records(config.evidence.dir) if r["kind"] == "invocation"]


@pytest.mark.parametrize(
    "tool, code",
    [
        ("slow_tool", "upstream_timeout"),
        ("broken_tool", "upstream_error"),
        ("huge_tool", "upstream_too_large"),
        ("garbage_tool", "upstream_malformed"),
        ("bigint_tool", "upstream_malformed"),  # 2^60+1 would reach the agent as another number
        ("down_tool", "upstream_unavailable"),
        ("create_ticket", "invalid_arguments"),  # the URL needs {project}
    ],
)
async def test_upstream_faults_are_clear_errors_recorded_and_serving_goes_on(sidecar, tool, code):
    running, _, config = sidecar
    response = await invoke(running.addresses[0], tool, {"title": "t"})
    assert response.decision.outcome == sidecar_pb2.OUTCOME_ALLOW
    assert response.error.startswith(code + ":"), response
    invocation = [r for r in records(config.evidence.dir) if r["kind"] == "invocation"]
    assert invocation[-1]["reasons"][0].startswith(code)
    again = await invoke(running.addresses[0], "create_ticket", {"project": "p", "title": "t"})
    assert again.status == "ok"


async def test_a_tls_failure_is_a_clear_error_and_nothing_is_sent(tmp_path, sidecar_config, running_sidecar):
    """An upstream whose certificate the sidecar does not trust (a private test CA)."""
    import ssl

    from cryptography.hazmat.primitives import serialization

    from tests.doubles.pki import TestCa

    svid = TestCa("example.org").issue("/tickets")
    (tmp_path / "cert.pem").write_bytes(svid.chain_pem())
    (tmp_path / "key.pem").write_bytes(svid.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    reached = []

    async def handle(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/x", handle)
    async with serve_app(app, ssl_context=context) as base:
        sidecar = await running_sidecar(sidecar_config(**{
            "listen.unix": "", "policy.dir": str(write_policy(tmp_path / "policy", POLICY)),
            "invoke.tools": {"create_ticket": {"url": base + "/x"}},
        }))
        response = await invoke(sidecar.addresses[0], "create_ticket", {"title": "t"})
        assert response.decision.outcome == sidecar_pb2.OUTCOME_ALLOW
        assert response.error.startswith("upstream_unavailable: TLS with"), response.error
        assert not reached


# Invoke makes the call itself, to the HTTP tool `invoke.tools` names: a `server` the caller names would
# reach policy, approvals and evidence but not the call, so policy could decide on a server the call never
# goes to (and an approval for another server's tool of the same name could be spent on the HTTP tool).
INVOKE_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    # A policy that trusts tool.server: the sandbox copy of the tool may run freely.
    decision := {"outcome": "allow", "reasons": ["sandbox: free to run"], "obligations": {}} if {
        input.tool.name == "drop_table"
        input.tool.server == "sandbox"
    }

    decision := {"outcome": "escalate", "reasons": ["production: needs approval"], "obligations": {}} if {
        input.tool.name == "drop_table"
        input.tool.server != "sandbox"
        input.approval == null
    }

    decision := {"outcome": "allow", "reasons": ["approved"], "obligations": {}} if {
        input.tool.name == "drop_table"
        input.tool.server != "sandbox"
        input.approval != null
    }
"""


@contextlib.asynccontextmanager
async def recording_tool(path: str, answer: dict):
    """A real HTTP tool on loopback that answers POST `path` with `answer`: (its base URL, the bodies it got)."""
    bodies: list[dict] = []

    async def handle(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post(path, handle)
    async with serve_app(app) as base:
        yield base, bodies


@pytest.fixture
async def production_tool():
    async with recording_tool("/drop", {"dropped": True}) as tool:
        yield tool


async def invoke_sidecar(tmp_path, sidecar_config, running_sidecar, base):
    return await running_sidecar(sidecar_config(**{
        "listen.unix": "",
        "policy.dir": str(write_policy(tmp_path / "policy", INVOKE_POLICY)),
        "invoke.tools": {"drop_table": {"method": "POST", "url": base + "/drop"}},
    }))


@pytest.mark.parametrize("server", ["sandbox", "prod", "Sandbox", " "])
async def test_invoke_refuses_a_server_the_caller_names(tmp_path, sidecar_config, running_sidecar, production_tool,
                                                         server):
    base, calls = production_tool
    sidecar = await invoke_sidecar(tmp_path, sidecar_config, running_sidecar, base)
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        answer = await stub.Invoke(sidecar_pb2.InvokeRequest(call=sidecar_pb2.AuthorizeRequest(
            tool="drop_table", server=server, call_id="c-1",
        )))
    assert answer.decision.outcome == sidecar_pb2.OUTCOME_DENY, answer
    assert answer.decision.reasons[0].startswith("invalid_server:"), answer.decision.reasons
    assert answer.status == "" and calls == []  # the production tool was never called
    decision = next(r for r in records(tmp_path / "evidence") if r["kind"] == "decision")
    assert decision["outcome"] == "deny" and decision["server"] == server and decision["call_id"] == "c-1"


async def test_invoke_without_a_server_is_decided_as_the_http_tool_and_escalates(
        tmp_path, sidecar_config, running_sidecar, production_tool):
    base, calls = production_tool
    sidecar = await invoke_sidecar(tmp_path, sidecar_config, running_sidecar, base)
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        answer = await stub.Invoke(sidecar_pb2.InvokeRequest(call=sidecar_pb2.AuthorizeRequest(tool="drop_table")))
    assert answer.decision.outcome == sidecar_pb2.OUTCOME_ESCALATE, answer
    assert answer.status == "" and calls == []


CLAMP_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok: search, at most 5 results, no debug, no token"], "obligations": {
        "clamp_arguments": {"limit": 5}, "drop_arguments": ["debug"], "redact_call_arguments": ["token"],
        "cap_list_arguments": {"tags": 1},
    }} if input.tool.name == "search"
"""


@pytest.fixture
async def search_tool():
    async with recording_tool("/search", {"ok": True}) as tool:
        yield tool


# Many tools read argument names without case (ASP.NET's model binding, Jackson or System.Text.Json set
# to be case-insensitive), some after NFKC folding: there `LIMIT` or a fullwidth `ｌｉｍｉｔ` is the
# `limit` the obligation clamps, and a second spelling beside it may win. Such a call is not made.
@pytest.mark.parametrize("arguments", [
    {"LIMIT": 1000},
    {"\uff4c\uff49\uff4d\uff49\uff54": 1000},  # fullwidth "limit"
    {"Debug": True},
    {"TOKEN": "secret-1"},
    {"Tags": ["a", "b", "c"]},
])
async def test_an_obligation_cannot_be_sidestepped_by_another_spelling_of_the_argument(
        tmp_path, sidecar_config, running_sidecar, search_tool, arguments):
    base, bodies = search_tool
    sidecar = await running_sidecar(sidecar_config(**{
        "listen.unix": "", "policy.dir": str(write_policy(tmp_path / "policy", CLAMP_POLICY)),
        "invoke.tools": {"search": {"method": "POST", "url": base + "/search"}},
    }))
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        stub = sidecar_pb2_grpc.ToolGateStub(channel)
        request = sidecar_pb2.AuthorizeRequest(tool="search")
        request.arguments.update({"query": "q", **arguments})
        answer = await stub.Invoke(sidecar_pb2.InvokeRequest(call=request))
        assert answer.decision.outcome == sidecar_pb2.OUTCOME_ALLOW
        assert answer.status == "not_called" and answer.error.startswith("obligation_inapplicable:"), answer
        assert bodies == []
        plain = sidecar_pb2.AuthorizeRequest(tool="search")
        plain.arguments.update({"query": "q", "limit": 50, "debug": True, "token": "t", "tags": ["a", "b"]})
        fine = await stub.Invoke(sidecar_pb2.InvokeRequest(call=plain))
        assert fine.status == "ok", fine
    assert bodies == [{"query": "q", "limit": 5, "token": "[REDACTED]", "tags": ["a"]}]
    invocation = [r for r in records(tmp_path / "evidence") if r["kind"] == "invocation"][0]
    assert invocation["status"] == "not_called"


async def test_two_spellings_of_one_argument_are_denied_before_policy_and_nothing_is_sent(
        tmp_path, sidecar_config, running_sidecar, search_tool):
    """`limit` and `Limit` side by side: a tool reading names without case runs with either, so the call
    is decided on neither (tests/test_core_key_spellings.py), with or without an obligation naming it."""
    base, bodies = search_tool
    sidecar = await running_sidecar(sidecar_config(**{
        "listen.unix": "", "policy.dir": str(write_policy(tmp_path / "policy", CLAMP_POLICY)),
        "invoke.tools": {"search": {"method": "POST", "url": base + "/search"}},
    }))
    async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
        request = sidecar_pb2.AuthorizeRequest(tool="search")
        request.arguments.update({"query": "q", "limit": 3, "Limit": 1000})
        answer = await sidecar_pb2_grpc.ToolGateStub(channel).Invoke(sidecar_pb2.InvokeRequest(call=request))
    assert answer.decision.outcome == sidecar_pb2.OUTCOME_DENY and answer.status == "", answer
    assert answer.decision.reasons[0].startswith("invalid_arguments: arguments has the keys"), answer
    assert bodies == []
    decisions = [r for r in records(tmp_path / "evidence") if r["kind"] == "decision"]
    assert [d["outcome"] for d in decisions] == ["deny"]
