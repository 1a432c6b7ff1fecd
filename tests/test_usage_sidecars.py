"""Shared limits through real sidecars: two sidecars on one real PostgreSQL (usage.store: postgres).

Each sidecar is a full `start_sidecar` (gRPC server, policy from rego/,
evidence log), or an `agent-sidecar serve` process; callers talk to it over gRPC. The shipped rate rule denies
the call past `max_calls_in_window` per (subject, tool); in dev mode every
caller is the same SPIFFE ID, so the calls below are replicas of one agent.
"""

from __future__ import annotations

import asyncio
import textwrap

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.client import AsyncClient
from sidecar.evidence.show import iter_lines
from sidecar.policy.catalog import read_data
from tests.conftest import REGO
from tests.doubles.postgres import PostgresServer
from tests.infra.sidecar import SidecarProcess

UNREACHABLE = "host=/tmp/no-such-postgres-dir port=1 user=x dbname=x"


@pytest.fixture
def limit() -> int:
    return read_data(REGO)[0]["sidecar"]["limits"]["max_calls_in_window"]


@pytest.fixture
def shared_config(sidecar_config, tmp_path):
    """Config for sidecar `name` on one fresh database: its own socket and evidence dir."""
    dsn = PostgresServer.shared().new_database()

    def make(name: str, **overrides):
        return sidecar_config(**{
            "listen.unix": str(tmp_path / name / "sidecar.sock"),
            "evidence.dir": str(tmp_path / name / "evidence"),
            "sidecar.instance_id": name,
            "usage.store": "postgres",
            "usage.dsn": dsn,
            "usage.timeout_ms": 2000,
            "policy.timeout_ms": 5000,  # a loaded test machine must not turn allows into policy_timeout
            **overrides,
        })

    return make


async def calls(sidecar, n: int, tool: str = "create_ticket") -> list:
    async with AsyncClient(sidecar.addresses[0]) as client:
        key = "query" if tool == "search_docs" else "title"
        return [await client.authorize(tool, {key: f"t{i}"}) for i in range(n)]


async def test_two_sidecars_share_the_window_and_it_survives_a_restart(running_sidecar, shared_config, limit):
    first = await running_sidecar(shared_config("first"))
    second = await running_sidecar(shared_config("second"))
    third_of_limit = limit // 3
    before = await calls(first, third_of_limit) + await calls(second, third_of_limit)
    await first.stop(grace=0)  # a restart: a new sidecar on the same database and evidence dir
    restarted = await running_sidecar(shared_config("first"))
    rest = await calls(restarted, limit - 2 * third_of_limit)
    assert all(r.outcome == "allow" for r in before + rest), [r.reasons for r in before + rest if r.outcome != "allow"]

    over_second, over_restarted = (await calls(second, 1))[0], (await calls(restarted, 1))[0]
    for result in (over_second, over_restarted):
        assert result.outcome == "deny"
        assert any(r.startswith("rate_limited:") for r in result.reasons), result.reasons
    # Another tool has its own window.
    assert (await calls(second, 1, tool="search_docs"))[0].outcome == "allow"


async def test_memory_store_counts_each_sidecar_alone(running_sidecar, sidecar_config, tmp_path, limit):
    """The contrast: with the default store each sidecar gives the agent the whole limit."""
    sidecars = [
        await running_sidecar(sidecar_config(**{
            "listen.unix": str(tmp_path / name / "s.sock"), "evidence.dir": str(tmp_path / name / "ev"),
            "policy.timeout_ms": 5000,
        }))
        for name in ("a", "b")
    ]
    results = await calls(sidecars[0], limit) + await calls(sidecars[1], limit)
    assert all(r.outcome == "allow" for r in results)


async def test_an_unreachable_store_denies_with_a_reason_recorded_and_in_health(running_sidecar, shared_config):
    config = shared_config("down", **{"usage.dsn": UNREACHABLE, "usage.timeout_ms": 300})
    evidence_dir = config.evidence.dir
    sidecar = await running_sidecar(config)
    async with AsyncClient(sidecar.addresses[0]) as client:
        result = await client.authorize("search_docs", {"query": "x"}, task_id="t-1")
        assert result.outcome == "deny"
        assert result.reasons[0].startswith("usage_unavailable:"), result.reasons
        assert "no-such-postgres-dir" in result.reasons[0]
        # A call that needs approval is not escalated either: no escalation waits on a count nobody made.
        escalated = await client.authorize("send_email", {"to": ["cfo@example.com"], "subject": "Q3", "body": "hi"})
        assert escalated.outcome == "deny" and not escalated.escalation_id
        await sidecar.health.refresh()
        async with grpc.aio.insecure_channel(sidecar.addresses[0]) as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    serving, detail = sidecar.health.snapshot()
    assert not serving and "usage: NOT OK" in detail and "calls are denied" in detail

    decisions = [record for _, record in iter_lines(evidence_dir) if record.get("kind") == "decision"]
    assert [d["outcome"] for d in decisions] == ["deny", "deny"]
    assert all(d["reasons"][0].startswith("usage_unavailable:") for d in decisions), decisions
    assert all(d["engine_error"].startswith("usage_unavailable:") for d in decisions)
    # Counted as a stage failing closed, like an engine or evidence failure.
    assert sidecar.metrics.registry.get_sample_value("sidecar_fail_closed_total", {"engine": "sidecar"}) == 2


async def test_on_store_error_memory_keeps_serving_from_local_counts(running_sidecar, shared_config):
    sidecar = await running_sidecar(shared_config(
        "fallback", **{"usage.dsn": UNREACHABLE, "usage.timeout_ms": 300, "usage.on_store_error": "memory"}
    ))
    result = (await calls(sidecar, 1, tool="search_docs"))[0]
    assert result.outcome == "allow", result.reasons
    assert not sidecar.usage.health()[0]


async def remote_calls(address: str, n: int) -> list:
    async with AsyncClient(address) as client:
        return [await client.authorize("create_ticket", {"title": f"t{i}"}) for i in range(n)]


async def test_two_sidecar_processes_share_the_window_across_a_process_restart(tmp_path, limit):
    dsn = PostgresServer.shared().new_database()
    sidecars = {}
    for name in ("a", "b"):
        socket_path = tmp_path / name / "sidecar.sock"
        config = tmp_path / f"{name}.yaml"
        config.write_text(textwrap.dedent(f"""
            listen: {{tcp: "", unix: "{socket_path}"}}
            policy: {{dir: "{REGO}", reload: false, timeout_ms: 5000}}
            sidecar: {{instance_id: {name}}}
            evidence: {{dir: "{tmp_path / name / 'evidence'}"}}
            telemetry: {{exporter: none}}
            usage: {{store: postgres, dsn: "{dsn}", timeout_ms: 2000}}
            identity: {{sources: [dev]}}
        """))
        sidecars[name] = SidecarProcess(config, tmp_path / f"{name}.log")
        sidecars[name].start()  # from this thread: the process dies with the thread that started it
    try:
        for sidecar in sidecars.values():
            await asyncio.to_thread(sidecar.wait_serving)
        address = {name: f"unix:{tmp_path / name / 'sidecar.sock'}" for name in sidecars}
        half = limit // 2
        first = await remote_calls(address["a"], half) + await remote_calls(address["b"], limit - half - 1)
        assert await asyncio.to_thread(sidecars["a"].stop) == 0  # a restart: the same config, a new process
        sidecars["a"].start()
        await asyncio.to_thread(sidecars["a"].wait_serving)
        last = await remote_calls(address["a"], 1)
        assert all(r.outcome == "allow" for r in first + last), [r.reasons for r in first + last if r.outcome != "allow"]
        for name in ("a", "b"):
            (over,) = await remote_calls(address[name], 1)
            assert over.outcome == "deny" and any(r.startswith("rate_limited:") for r in over.reasons), over.reasons
    finally:
        for sidecar in sidecars.values():
            sidecar.close()
