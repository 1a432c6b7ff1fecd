"""Dev mode only when a config asks for it: the default identity is the SPIRE Workload API.

`identity.sources` defaults to [workload_api] (DESIGN.md "Identity": `dev` only
when asked for in config). So `agent-sidecar serve` with no config refuses to
start, naming the key and how to try it locally; a config without `identity`
never hands a caller the dev identity; and the commands that serve nothing
(`check`, `policy test`) still run with no config. And dev mode, where every
caller is the agent and any caller approves, serves only on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.client import AsyncClient
from sidecar.config import Config, ConfigError, load_config
from tests.conftest import LOADED_MACHINE, REGO, REPO

CLI = [sys.executable, "-m", "sidecar"]
TRY_LOCALLY = "--config examples/dev.yaml"
PEOPLE = ["email:*@example.org"]


def run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def without_workload_api_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SPIFFE_ENDPOINT_SOCKET"}


def test_the_default_config_is_not_dev_mode(tmp_path):
    assert Config().identity.sources == ["workload_api"] and not Config().dev_mode
    # The defaults alone cannot serve: the Workload API identifies callers on listen.unix ...
    with pytest.raises(ConfigError, match=r"^identity\.sources: workload_api identifies callers on listen\.unix"):
        load_config(None)
    # ... and outside dev mode nothing defaults open (docs/configuration.md "Outside dev mode").
    with pytest.raises(ConfigError, match=r"^escalation\.approvers: required outside dev mode"):
        load_config(None, {"listen.unix": str(tmp_path / "s.sock")})
    # A file without an identity section is not dev mode either.
    path = tmp_path / "sidecar.yaml"
    path.write_text(f"listen: {{unix: {tmp_path / 's.sock'}}}\nescalation: {{approvers: ['email:*@example.org']}}\n")
    config = load_config(path)
    assert config.identity.sources == ["workload_api"] and not config.dev_mode
    # Commands that serve nothing read the same defaults, without what only serving needs.
    offline = load_config(None, runs_sidecar=False)
    assert offline.identity.sources == ["workload_api"] and not offline.dev_mode
    # Dev mode exists where a config says so, as examples/dev.yaml does.
    assert load_config(REPO / "examples" / "dev.yaml").dev_mode


def test_serve_with_no_config_refuses_to_start_and_says_how_to_try_it(tmp_path):
    done = run("serve", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""  # never "serving"
    assert done.stderr.startswith("agent-sidecar: identity.sources: workload_api identifies callers on listen.unix")
    assert "no --config was given" in done.stderr and f"agent-sidecar serve {TRY_LOCALLY}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "var").exists()  # refused before anything started (no evidence log, no OPA)
    # With a socket to listen on, the next thing outside dev mode is named: who may approve.
    done = run("serve", "--listen", f"unix:{tmp_path / 's.sock'}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("agent-sidecar: escalation.approvers: required outside dev mode")
    assert f"agent-sidecar serve {TRY_LOCALLY}" in done.stderr
    assert not (tmp_path / "var").exists()
    helped = run("serve", "--help")
    assert helped.returncode == 0 and TRY_LOCALLY in helped.stdout and "workload_api" in helped.stdout
    # The console with no config: outside dev mode it needs the auth proxy's header (and its own JWT-SVID).
    console = run("console", "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert console.returncode == 2 and console.stdout == "", console.stderr
    assert console.stderr.startswith("agent-sidecar: console.trusted_header: required outside dev mode")
    assert f"agent-sidecar console {TRY_LOCALLY}" in console.stderr


def test_the_workload_api_without_a_socket_refuses_to_start_never_dev(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"listen: {{tcp: '', unix: {tmp_path / 's.sock'}}}\n"
        f"policy: {{dir: {REGO}, reload: false}}\n"
        f"evidence: {{dir: {tmp_path / 'evidence'}}}\n"
        "telemetry: {exporter: none}\n"
        "escalation: {approvers: ['email:*@example.org']}\n"
    )
    done = run("serve", "--config", str(config), env=without_workload_api_env())
    assert done.returncode == 2, done.stderr
    assert "serving" not in done.stdout
    message = done.stderr.split("agent-sidecar: ", 1)[1]
    assert message.startswith("identity.workload_api_socket: empty and SPIFFE_ENDPOINT_SOCKET is not set"), message
    assert f"agent-sidecar serve {TRY_LOCALLY}" in message and "Traceback" not in done.stderr


async def test_a_config_without_identity_never_gives_a_caller_source_dev(tmp_path, monkeypatch, running_sidecar):
    """The Workload API not there yet: health is not SERVING and calls are denied with the reason, never dev."""
    sockets = Path(os.path.realpath("/tmp")) / f"dd-{os.getpid()}-{tmp_path.name[-12:]}"
    sockets.mkdir()
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", f"unix://{sockets}/missing-agent.sock")
    config = load_config(None, {
        **LOADED_MACHINE,
        "listen.tcp": "127.0.0.1:0",
        "listen.unix": str(sockets / "sidecar.sock"),
        "policy.dir": str(REGO),
        "policy.reload": False,
        "evidence.dir": str(tmp_path / "evidence"),
        "telemetry.exporter": "none",
        "escalation.approvers": PEOPLE,
        "identity.workload_api_max_backoff_ms": 200,
    })
    assert not config.dev_mode
    try:
        sidecar = await running_sidecar(config)
        assert not sidecar.identity.health()[0]
        for address in sidecar.addresses:  # the pod's unix socket and TCP alike
            async with grpc.aio.insecure_channel(address) as channel:
                call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert (await call).status == health_pb2.HealthCheckResponse.NOT_SERVING
                detail = dict(await call.trailing_metadata()).get("sidecar-health-detail", "")
                assert "identity" in detail and "DEV MODE" not in detail
            async with AsyncClient(address) as agent:
                result = await agent.authorize("search_docs", {"query": "x"})
            assert result.outcome == "deny", result
            assert result.reasons[0].startswith("unverified_caller: "), result.reasons
        records = [json.loads(line) for path in sorted((tmp_path / "evidence").glob("evidence-*.jsonl"))
                   for line in path.read_text().splitlines()]
        decisions = [r for r in records if r["kind"] == "decision"]
        assert len(decisions) == len(sidecar.addresses)
        assert all(r["subject"] is None for r in decisions)
        assert '"source":"dev"' not in "".join(json.dumps(r, separators=(",", ":")) for r in records)
    finally:
        for leftover in sockets.iterdir():
            leftover.unlink()
        sockets.rmdir()


def test_check_needs_no_dev_mode_config_the_subject_source_is_its_own_option(tmp_path):
    """README's example, with no --config: `--source` (default dev) says the subject's source."""
    args = ("check", "--subject", "spiffe://dev.local/agent", "--tool", "read_file",
            "--args", '{"path": "/workspace/notes.txt"}', "--compact")
    as_dev = run(*args)
    assert as_dev.returncode == 0, as_dev.stderr
    assert json.loads(as_dev.stdout)["outcome"] == "allow"
    # The dev grants match only a subject whose source is dev (rego/sidecar/grants.rego): the option decides.
    as_pod = run(*args, "--source", "workload_api")
    assert as_pod.returncode == 3 and json.loads(as_pod.stdout)["outcome"] == "deny", as_pod.stderr
    # A file given to check is a sidecar's config: refused where serve would refuse it, with the way out.
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(f"policy: {{dir: {REGO}}}\n")
    refused = run("check", "--config", str(tiny), *args[1:])
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("agent-sidecar: identity.sources: workload_api identifies callers on listen.unix")
    assert f"{tiny} applies" in refused.stderr and f"agent-sidecar check {TRY_LOCALLY}" in refused.stderr
    # policy test reads only policy.opa.binary from a file: it needs no identity settings at all.
    tested = run("policy", "test", "--config", str(tiny), str(REGO))
    assert tested.returncode == 0, tested.stdout


DEV_OFF_LOOPBACK = [
    ("listen.tcp", "0.0.0.0:50051"),
    ("listen.tcp", "192.0.2.2:50051"),
    ("listen.tcp", "[::]:50051"),
    ("listen.tcp", "sidecar.example.org:50051"),
    ("mcp.listen", "0.0.0.0:8765"),
    ("mcp.listen", "[::ffff:127.0.0.1]:8765"),
]


@pytest.mark.parametrize("key, listen", DEV_OFF_LOOPBACK)
def test_dev_mode_serves_only_on_loopback(key: str, listen: str):
    """In dev mode every caller is the agent and any caller approves, naming any approver: on 0.0.0.0 a
    peer at 192.0.2.2 escalated send_email, approved it as email:cfo@example.org and ran it."""
    with pytest.raises(ConfigError) as info:
        load_config(None, {"identity.sources": ["dev"], key: listen})
    assert str(info.value).startswith(f"{key}: {listen} is not a loopback address"), str(info.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:50051", "localhost:50051"])
def test_dev_mode_on_loopback_still_loads(listen: str):
    config = load_config(None, {"identity.sources": ["dev"], "listen.tcp": listen, "mcp.listen": listen})
    assert config.dev_mode and config.listen.tcp == listen


def test_outside_dev_mode_the_same_listeners_load():
    config = load_config(None, {"identity.sources": ["mtls"], "listen.tcp": "0.0.0.0:50051",
                                "escalation.approvers": ["email:*@example.org"]})
    assert config.listen.tcp == "0.0.0.0:50051"


def test_a_dev_console_serves_only_on_loopback():
    config = load_config(None, {"identity.sources": ["dev"], "console.listen": "0.0.0.0:8080",
                                "console.dev_approver": "email:dev@example.org"})
    with pytest.raises(ConfigError, match=r"console.listen: 0.0.0.0:8080 is not a loopback address"):
        config.validate_console()


async def test_a_dev_sidecar_on_every_address_does_not_start(running_sidecar, sidecar_config):
    with pytest.raises(ConfigError, match="is not a loopback address"):
        await running_sidecar(sidecar_config(**{"listen.tcp": "0.0.0.0:0"}))
