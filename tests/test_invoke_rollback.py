"""`agent-sidecar rollback DECISION_ID`: the undo tool named in the catalog is called with the
recorded rollback token, through the running sidecar, decided by policy and recorded."""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import pytest
import yaml
from mcp.client.client import Client

from sidecar.cli import main
from sidecar.evidence.verify import verify_dir
from sidecar.invoke.rollback import RollbackError, plan_rollback
from tests.conftest import REPO, write_policy
from tests.infra.http import recording_proxy
from tests.mcp_upstreams import Seen, docs_server, serve_http

POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok: listed"], "obligations": {}} if {
        input.tool.name in {"send", "whoami"}
    }

    decision := {"outcome": "allow", "reasons": ["ok: undo"], "obligations": {}} if {
        input.tool.name == "unsend"
        startswith(input.task.intent, "rollback of decision ")
    }
"""
CATALOG = {"tools": {  # data.sidecar.catalog
    "send": {"risk": "low", "undo": {"tool": "unsend", "token_argument": "message_token"}},
    "whoami": {"risk": "low"},
}}


@pytest.fixture
async def world(tmp_path, sidecar_config, running_sidecar):
    policy = write_policy(tmp_path / "policy", POLICY)
    (policy / "sidecar" / "catalog").mkdir(parents=True)
    (policy / "sidecar" / "catalog" / "data.json").write_text(json.dumps(CATALOG))
    seen = Seen()
    upstream = await serve_http(docs_server(seen))
    settings = {
        "listen": {"tcp": "127.0.0.1:0"},
        "policy": {"dir": str(policy), "reload": False},
        "evidence": {"dir": str(tmp_path / "evidence")},
        "telemetry": {"exporter": "none"},
        "identity": {"sources": ["dev"]},  # the running sidecar's (sidecar_config: dev)
        "mcp": {"listen": "127.0.0.1:0", "upstreams": {"docs": {"url": upstream.url}}},
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(settings))
    sidecar = await running_sidecar(sidecar_config(**{
        "listen.unix": "", "policy.dir": str(policy), "evidence.dir": str(tmp_path / "evidence"),
        "mcp.listen": "127.0.0.1:0", "mcp.upstreams": {"docs": {"url": upstream.url}},
    }))
    yield sidecar, seen, path, tmp_path / "evidence"
    await upstream.stop()


async def test_rollback_calls_the_undo_tool_with_the_recorded_token(world, capsys):
    sidecar, seen, config_path, evidence = world
    async with Client(sidecar.mcp.url) as agent:
        sent = await agent.call_tool("docs__send", {"to": ["a@example.com"], "body": "oops"},
                                     meta={"sidecar/task_id": "task-9"})
    decision_id = sent.meta["sidecar/decision_id"]
    capsys.readouterr()
    code = await asyncio.to_thread(
        main, ["rollback", decision_id, "--config", str(config_path), "--mcp-url", sidecar.mcp.url]
    )
    out = capsys.readouterr()
    assert out.out, (code, out.err)
    answer = json.loads(out.out)
    assert code == 0, answer
    assert answer["undo_tool"] == "unsend" and answer["outcome"] == "allow"
    assert seen.calls[-1] == ("unsend", {"message_token": "undo-42"})
    log = [json.loads(line) for line in (evidence / "evidence-000001.jsonl").read_text().splitlines()]
    undo_decision = next(r for r in log if r["kind"] == "decision" and r["tool"] == "unsend")
    assert undo_decision["intent"] == f"rollback of decision {decision_id}" and undo_decision["task_id"] == "task-9"
    assert [r["tool"] for r in log if r["kind"] == "invocation"] == ["send", "unsend"]
    assert verify_dir(evidence).ok


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def run_cli(*args: str) -> tuple[int, str, str]:
    """The real `agent-sidecar`, as a person runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def test_rollback_without_a_sidecar_says_where_it_looked(world, tmp_path):
    """Not running (or the wrong address): one line naming the address, exit 2, never a traceback; and
    with the sidecar up, stdout is the JSON and stderr holds no library's INFO lines."""
    sidecar, _, config_path, evidence = world
    async with Client(sidecar.mcp.url) as agent:
        first = await agent.call_tool("docs__send", {"to": ["a@example.com"], "body": "oops"})
        second = await agent.call_tool("docs__send", {"to": ["b@example.com"], "body": "oops"})
    port = _closed_port()
    gateway = f"http://127.0.0.1:{port}/mcp"
    through_invoke = tmp_path / "no-mcp.yaml"  # the same log and bundle, no MCP upstream: the undo goes to Invoke
    settings = yaml.safe_load(config_path.read_text())
    del settings["mcp"]
    through_invoke.write_text(yaml.safe_dump(settings))
    for args, address in (
        (["--config", str(config_path), "--mcp-url", gateway], gateway),
        (["--config", str(through_invoke), "--address", f"127.0.0.1:{port}"], f"127.0.0.1:{port}"),
    ):
        code, out, err = await run_cli("rollback", first.meta["sidecar/decision_id"], *args)
        assert (code, out) == (2, ""), (args, err)
        assert err.startswith(f"agent-sidecar rollback: cannot reach the sidecar at {address}: ")
        assert err.count("\n") == 1 and "Traceback" not in err, err
    code, out, err = await run_cli("rollback", second.meta["sidecar/decision_id"], "--config", str(config_path),
                                   "--mcp-url", sidecar.mcp.url)
    assert code == 0 and json.loads(out)["outcome"] == "allow", err
    assert " INFO " not in err, err


async def test_rollback_refuses_what_cannot_be_undone(world):
    sidecar, _, config_path, evidence = world
    async with Client(sidecar.mcp.url) as agent:
        plain = await agent.call_tool("docs__whoami", {})
        denied = await agent.call_tool("docs__forbidden", {})
    policy = yaml.safe_load(config_path.read_text())["policy"]["dir"]
    with pytest.raises(RollbackError, match="no rollback token"):
        plan_rollback(evidence, policy, plain.meta["sidecar/decision_id"])
    with pytest.raises(RollbackError, match="made no such call"):
        plan_rollback(evidence, policy, denied.meta["sidecar/decision_id"])
    with pytest.raises(RollbackError, match="made no such call"):
        plan_rollback(evidence, policy, "no-such-decision")


async def test_rollback_of_an_http_tool_goes_through_invoke(tmp_path, sidecar_config, running_sidecar, capsys):
    import grpc
    from aiohttp import web
    from google.protobuf.struct_pb2 import Struct

    from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

    calls = []

    async def handle(request: web.Request) -> web.Response:
        calls.append((request.path, await request.json()))
        return web.json_response({"ok": True}, headers={"x-rollback-token": "ticket-7"})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    policy = write_policy(tmp_path / "policy", POLICY.replace('{"send", "whoami"}', '{"send", "whoami", "open_ticket"}')
                          .replace('"unsend"', '"close_ticket"'))
    (policy / "sidecar" / "catalog").mkdir(parents=True)
    (policy / "sidecar" / "catalog" / "data.json").write_text(json.dumps({"tools": {
        "open_ticket": {"undo": {"tool": "close_ticket", "token_argument": "id"}}}}))
    tools = {"open_ticket": {"url": base + "/open"}, "close_ticket": {"url": base + "/close"}}
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump({"policy": {"dir": str(policy)}, "evidence": {"dir": str(tmp_path / "evidence")},
                                    "identity": {"sources": ["dev"]}, "invoke": {"tools": tools}}))
    sidecar = await running_sidecar(sidecar_config(**{
        "listen.unix": "", "policy.dir": str(policy), "evidence.dir": str(tmp_path / "evidence"), "invoke.tools": tools,
    }))
    try:
        arguments = Struct()
        arguments.update({"title": "t"})
        async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
            opened = await sidecar_pb2_grpc.ToolGateStub(channel).Invoke(
                sidecar_pb2.InvokeRequest(call=sidecar_pb2.AuthorizeRequest(tool="open_ticket", arguments=arguments)))
        assert opened.status == "ok"
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["rollback", opened.decision.decision_id, "--config", str(path),
                                              "--address", sidecar.addresses[0]])
        answer = json.loads(capsys.readouterr().out)
        assert code == 0 and answer["status"] == "ok" and answer["outcome"] == "allow", answer
        assert calls[-1] == ("/close", {"id": "ticket-7"})
    finally:
        await runner.cleanup()


async def test_rollback_sends_its_token_only_where_no_one_on_the_path_reads_it(world, tmp_path):
    """The rollback client speaks no TLS to gRPC and follows the URL it is given: with --token-file, a
    gateway over http:// off loopback or a gRPC address off the pod is refused before anything is sent
    (exit 2); on loopback the token goes straight there, never through a proxy from the environment."""
    sidecar, _, config_path, evidence = world
    async with Client(sidecar.mcp.url) as agent:
        sent = await agent.call_tool("docs__send", {"to": ["a@example.com"], "body": "oops"})
    decision_id = sent.meta["sidecar/decision_id"]
    token = tmp_path / "token"
    token.write_text("jwt-svid-must-stay-here")
    through_invoke = tmp_path / "no-mcp.yaml"
    settings = yaml.safe_load(config_path.read_text())
    del settings["mcp"]
    through_invoke.write_text(yaml.safe_dump(settings))
    for args, target, over in (
        (["--config", str(config_path), "--mcp-url", "http://agent-sidecar.agents.svc:8765/mcp"],
         "http://agent-sidecar.agents.svc:8765/mcp", "http://"),
        (["--config", str(config_path), "--mcp-url", "HTTP://127.0.0.1@evil.example:8765/mcp"],
         "HTTP://127.0.0.1@evil.example:8765/mcp", "http://"),
        (["--config", str(through_invoke), "--address", "10.0.0.5:50051"], "10.0.0.5:50051", "plaintext gRPC"),
        (["--config", str(through_invoke), "--address", "dns:///agent-sidecar.agents.svc:50051"],
         "dns:///agent-sidecar.agents.svc:50051", "plaintext gRPC"),
    ):
        code, out, err = await run_cli("rollback", decision_id, "--token-file", str(token), *args)
        assert (code, out) == (2, ""), (args, err)
        assert err.startswith(f"agent-sidecar: --token-file: the JWT-SVID would go in clear over {over} to {target!r}"), err
    async with recording_proxy() as (env, proxied):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "rollback", decision_id, "--config", str(config_path),
            "--mcp-url", sidecar.mcp.url, "--token-file", str(token), cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    assert proxied == []
    assert process.returncode == 0 and json.loads(out)["outcome"] == "allow", err
