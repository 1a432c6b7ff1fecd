"""End to end: a real gRPC sidecar deciding through its managed OPA (the real binary).

The agent sees allow while OPA answers, a deny naming OPA while OPA is stopped
(SIGSTOP) or dead (SIGKILL, until the runner has restarted it), and allow again
by itself; the health service and the evidence follow; `check` decides as the
server does and says when the server serves an older revision.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.client import AsyncClient
from sidecar.policy.catalog import read_data
from sidecar.policy.opa.runner import find_opa
from tests.conftest import REPO, SIMPLE_POLICY, write_policy
from tests.test_opa_client import stop

TESTS = """\
    package sidecar.tests
    test_echo_allowed if data.sidecar.decision.outcome == "allow" with input as {"tool": {"name": "echo"}}
"""


def small_bundle(tmp_path):
    directory = write_policy(tmp_path / "policy", SIMPLE_POLICY, tests=TESTS)
    (directory / "sidecar" / "catalog").mkdir(parents=True)
    (directory / "sidecar" / "catalog" / "data.yaml").write_text("tools:\n  echo: {risk: low}\n")
    return directory


def evidence_records(tmp_path) -> list[dict]:
    records = []
    for path in sorted((tmp_path / "evidence").glob("evidence-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


async def health(address: str) -> tuple[int, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        response = await call
        trailers = dict(await call.trailing_metadata() or ())
        return response.status, trailers.get("sidecar-health-detail", "")


async def until(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def test_decisions_follow_the_managed_opa_through_stop_kill_and_recovery(running_sidecar, sidecar_config, tmp_path):
    directory = small_bundle(tmp_path)
    sidecar = await running_sidecar(sidecar_config(**{
        "policy.dir": str(directory),
        # Liveness off: a stopped OPA stays the same process until it is resumed.
        "policy.opa": {"health_interval_ms": 50, "breaker_cooldown_ms": 200, "breaker_failures": 2,
                       "liveness_timeout_ms": 0},
    }))
    runner = sidecar.policy.runner
    address = sidecar.addresses[0]
    async with AsyncClient(address) as client:
        result = await client.authorize("echo", {"text": "hi"})
        assert result.outcome == "allow", result
        assert result.policy_revision == read_data(directory)[1] == sidecar.policy.revision
        await sidecar.health.refresh()
        status, detail = await health(address)
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert f"serving revision {result.policy_revision}" in detail

        # OPA hangs: calls are denied with a reason naming OPA and recorded with the engine error.
        stop(runner.pid)
        try:
            denied = await client.authorize("echo", {"text": "hi"})
            assert denied.outcome == "deny"
            assert denied.reasons[0].startswith("policy_timeout: OPA at unix://"), denied.reasons
            record = next(r for r in evidence_records(tmp_path) if r.get("decision_id") == denied.decision_id)
            assert record["outcome"] == "deny" and record["engine"] == "opa" and record["engine_error"] == denied.reasons[0]

            async def not_serving():
                await sidecar.health.refresh()
                return (await health(address))[0] == health_pb2.HealthCheckResponse.NOT_SERVING

            assert await until(not_serving)
            assert runner.restarts == 0
        finally:
            os.kill(runner.pid, signal.SIGCONT)

        async def allowed():
            return (await client.authorize("echo", {"text": "hi"})).outcome == "allow"

        assert await until(allowed)

        # OPA dies: the runner starts it again and calls recover by themselves.
        first = runner.pid
        os.kill(first, signal.SIGKILL)

        async def restarted():
            return runner.pid != first and runner.health()[0] and await allowed()

        assert await until(restarted)
        reasons = {r["reasons"][0].split(":")[0] for r in evidence_records(tmp_path) if r.get("outcome") == "deny"}
        assert reasons <= {"policy_timeout", "policy_unavailable"}, reasons


async def test_a_hung_managed_opa_is_replaced_and_calls_recover_without_resuming_it(
    running_sidecar, sidecar_config, tmp_path, caplog
):
    directory = small_bundle(tmp_path)
    sidecar = await running_sidecar(sidecar_config(**{
        "policy.dir": str(directory),
        "policy.opa": {"health_interval_ms": 50, "breaker_cooldown_ms": 200, "breaker_failures": 2,
                       "liveness_timeout_ms": 1000},
    }))
    runner = sidecar.policy.runner
    address = sidecar.addresses[0]
    async with AsyncClient(address) as client:
        assert (await client.authorize("echo", {"text": "hi"})).outcome == "allow"
        first = runner.pid
        stop(first)  # never resumed by this test
        try:
            denied = await client.authorize("echo", {"text": "hi"})
            if runner.pid == first:  # not replaced yet: a deny naming OPA
                assert denied.outcome == "deny" and "OPA at unix://" in denied.reasons[0], denied.reasons

            async def replaced_and_allowed():
                return (runner.pid != first and runner.health()[0]
                        and (await client.authorize("echo", {"text": "hi"})).outcome == "allow")

            assert await until(replaced_and_allowed, timeout=30.0)
            assert runner.restarts == 1
            assert not os.path.exists(f"/proc/{first}")  # killed and reaped, not resumed
        finally:
            if os.path.exists(f"/proc/{first}"):
                os.kill(first, signal.SIGKILL)
                os.kill(first, signal.SIGCONT)

        async def serving():  # OPA's health is polled (every 50 ms here): the first poll after the restart
            await sidecar.health.refresh()
            return (await health(address))[0] == health_pb2.HealthCheckResponse.SERVING

        assert await until(serving, timeout=30.0)  # as soon as it holds; room for a loaded machine
    assert any(f"OPA pid {first} hung: GET /health" in r.getMessage() for r in caplog.records)
    reasons = {r["reasons"][0].split(":")[0] for r in evidence_records(tmp_path) if r.get("outcome") == "deny"}
    assert reasons <= {"policy_timeout", "policy_unavailable"}, reasons


KILLED_SIDECAR = """
import asyncio, sys
from sidecar.policy.opa.service import PolicyService
async def main():
    service = PolicyService(sys.argv[1], reload=False)
    await service.start()
    print(service.runner.options.socket.parent, flush=True)  # OPA's socket is in the work directory
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_the_work_directory_of_a_sigkilled_sidecar_is_removed_by_the_next_start(tmp_path, monkeypatch):
    from sidecar.policy.opa.service import PolicyService

    temp = Path(tempfile.mkdtemp(prefix="st-"))  # short: unix socket paths are limited
    directory = small_bundle(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(temp)}
    process = subprocess.Popen([sys.executable, "-c", KILLED_SIDECAR, str(directory)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = Path(process.stdout.readline().strip())
        process.kill()  # SIGKILL: no cleanup runs
        process.wait(timeout=10)
        assert left.parent == temp and left.name.startswith(f"sidecar-opa-{process.pid}-") and left.is_dir()
        kept = temp / f"sidecar-opa-{live.pid}-x"  # a live owner's directory stays
        kept.mkdir()
        unrelated = temp / "sidecar-opa-notapid"  # not named by an owner: never touched
        unrelated.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        async with PolicyService(directory, reload=False) as service:
            assert not left.exists()
            assert kept.is_dir() and unrelated.is_dir()
            workdir = service.runner.options.socket.parent
            assert workdir.parent == temp and workdir.name.startswith(f"sidecar-opa-{os.getpid()}-") and workdir.is_dir()
    finally:
        for child in (process, live):
            child.kill()
            child.wait()
        shutil.rmtree(temp, ignore_errors=True)


async def test_a_rejected_reload_keeps_serving_and_the_health_detail_says_why(running_sidecar, sidecar_config, tmp_path):
    directory = small_bundle(tmp_path)
    sidecar = await running_sidecar(sidecar_config(**{"policy.dir": str(directory)}))
    (directory / "policy.rego").write_text("package sidecar\ndecision := := 1\n")
    assert await sidecar.policy.reload() is False
    await sidecar.health.refresh()
    status, detail = await health(sidecar.addresses[0])
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert "last reload rejected" in detail and "policy.rego:2" in detail
    async with AsyncClient(sidecar.addresses[0]) as client:
        assert (await client.authorize("echo", {})).outcome == "allow"


def test_check_decides_like_the_server_and_names_an_older_served_revision(tmp_path):
    directory = small_bundle(tmp_path)
    socket_path = tmp_path / "s.sock"
    config = tmp_path / "sidecar.yaml"
    config.write_text(textwrap.dedent(f"""\
        listen: {{tcp: '', unix: {socket_path}}}
        policy: {{dir: {directory}, reload: false}}
        evidence: {{dir: {tmp_path / 'evidence'}}}
        telemetry: {{exporter: none}}
        identity: {{sources: [dev]}}
    """))
    cli = [sys.executable, "-m", "sidecar"]
    check = [*cli, "check", "--config", str(config), "--subject", "spiffe://dev.local/agent", "--tool", "ping"]
    server = subprocess.Popen([*cli, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        assert "serving" in server.stdout.readline()
        served = read_data(directory)[1]
        same = subprocess.run(check, capture_output=True, text=True, cwd=REPO, timeout=60)
        decision = json.loads(same.stdout)
        assert decision["outcome"] == "deny" and decision["policy_revision"] == served and "note" not in decision

        (directory / "policy.rego").write_text(textwrap.dedent(SIMPLE_POLICY).replace('["echo",', '["echo", "ping",'))
        changed = subprocess.run(check, capture_output=True, text=True, cwd=REPO, timeout=60)
        decision = json.loads(changed.stdout)
        assert decision["outcome"] == "allow" and decision["policy_revision"] == read_data(directory)[1]
        assert f"still serves revision {served}" in decision["note"]
        assert "still serves revision" in changed.stderr
        # --policy naming another bundle (a candidate) is not what that server would ever reload to: no note.
        candidate = tmp_path / "candidate"
        shutil.copytree(directory, candidate)
        other = subprocess.run([*check, "--policy", str(candidate)], capture_output=True, text=True, cwd=REPO,
                               timeout=60)
        decision = json.loads(other.stdout)
        assert decision["outcome"] == "allow" and "note" not in decision and "still serves" not in other.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)


INEXACT_OBLIGATIONS = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok"], "obligations": {"limit": limits[input.tool.name]}}

    limits := {"exact": 9007199254740991, "huge": 1180591620717411303424, "fraction": 0.1, "deep": {"a": [1, 36893488147419103232]}}
"""


async def test_obligations_a_double_cannot_hold_deny_naming_the_field(running_sidecar, sidecar_config, tmp_path):
    """Real OPA writes integers past 2^53 exactly; the agent's proto would get them rounded, so the call is denied."""
    directory = write_policy(tmp_path / "policy", INEXACT_OBLIGATIONS)
    (directory / "sidecar" / "catalog").mkdir(parents=True)
    (directory / "sidecar" / "catalog" / "data.yaml").write_text("tools: {}\n")
    sidecar = await running_sidecar(sidecar_config(**{"policy.dir": str(directory)}))
    async with AsyncClient(sidecar.addresses[0]) as client:
        for tool, limit in (("exact", 9007199254740991), ("fraction", 0.1)):
            result = await client.authorize(tool, {})
            assert result.outcome == "allow" and result.obligations == {"limit": limit}, result
        for tool, where in (("huge", "obligations.limit"), ("deep", "obligations.limit.a[1]")):
            result = await client.authorize(tool, {})
            assert result.outcome == "deny", result
            assert result.reasons[0].startswith(f"policy_malformed: {where}: "), result.reasons
            assert "obligations must reach the agent exactly" in result.reasons[0]


async def test_an_external_opa_on_a_unix_socket_decides(running_sidecar, sidecar_config, tmp_path):
    """`policy.opa.url: unix:///path`, as the pod's OPA container serves it (deploy/k8s: a socket in a
    volume the agent container does not mount): the real OPA on its own socket decides the sidecar's calls."""
    socket_path = Path(tempfile.mkdtemp(prefix="ext-opa-")) / "opa.sock"  # a short path: at most 107 bytes
    policy = write_policy(tmp_path / "rego", SIMPLE_POLICY)
    opa = subprocess.Popen([str(find_opa("opa")), "run", "--server", f"--addr=unix://{socket_path}",
                            "--unix-socket-perm=700", str(policy)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60  # OPA first (the pod starts its OPA container before the sidecar)
        while subprocess.run(["curl", "-sf", "--unix-socket", str(socket_path), "http://opa/health"],
                             capture_output=True).returncode != 0:
            assert opa.poll() is None and time.monotonic() < deadline, "OPA did not come up on its socket"
            time.sleep(0.05)
        sidecar = await running_sidecar(sidecar_config(**{
            "policy.dir": str(policy), "policy.opa": {"url": f"unix://{socket_path}"},
        }))
        async with AsyncClient(sidecar.addresses[0]) as client:
            allowed = await client.authorize("echo", {"text": "hi"})
            denied = await client.authorize("rm", {"path": "/"})
        assert allowed.outcome == "allow" and denied.outcome == "deny"
        await sidecar.health.refresh()
        ok, detail = sidecar.health.snapshot()
        assert ok and f"OPA at unix://{socket_path} is healthy" in detail, detail
    finally:
        opa.terminate()
        opa.wait(30)
