"""The policy service on small private bundles with the real OPA: first start, hot reload
(blue/green), rejected bundles (compile error, failing tests, bad data), external OPA."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import textwrap
import time

import pytest

from sidecar.policy.catalog import Catalog, CatalogError, read_data
from sidecar.policy.opa.client import OpaClientOptions
from sidecar.policy.opa.runner import OpaNotFound, find_opa
from sidecar.policy.opa.service import ManagedOpaOptions, PolicyRejected, PolicyService
from tests.conftest import SIMPLE_POLICY, write_policy
from tests.test_core_grpc import opa_children

INPUT = {"version": "sidecar/v1", "tool": {"name": "echo", "arguments": {}}}
PING = {**INPUT, "tool": {"name": "ping"}}
TESTS = """\
    package sidecar.tests
    test_echo_allowed if data.sidecar.decision.outcome == "allow" with input as {"tool": {"name": "echo"}}
"""
CATALOG = "tools:\n  echo: {risk: low}\n"


def policy_dir(tmp_path, rego: str = SIMPLE_POLICY, tests: str | None = TESTS):
    directory = write_policy(tmp_path / "p", rego, tests=tests)
    (directory / "sidecar" / "catalog").mkdir(parents=True, exist_ok=True)
    (directory / "sidecar" / "catalog" / "data.yaml").write_text(CATALOG)
    return directory


@pytest.fixture
async def service():
    started: list[PolicyService] = []

    async def start(directory, **options) -> PolicyService:
        options.setdefault("reload", False)
        policy = PolicyService(directory, OpaClientOptions(timeout_ms=1000, health_interval_ms=50), **options)
        await policy.start()
        started.append(policy)
        return policy

    yield start
    for policy in started:
        await policy.aclose()


async def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_serves_decisions_catalog_and_the_revision_opa_reports(tmp_path, service):
    directory = policy_dir(tmp_path)
    policy = await service(directory)
    allowed = await policy.decide(INPUT)
    assert (allowed.outcome, allowed.reasons, allowed.engine) == ("allow", ("ok: listed",), "opa")
    revision = read_data(directory)[1]
    assert revision.startswith("sha256:")
    assert allowed.policy_revision == revision == policy.revision == policy.catalog.revision  # OPA's ?provenance
    assert policy.catalog.entry("echo") == {"risk": "low"} and policy.catalog.entry("nope") is None
    ready, detail = policy.ready()
    assert ready and f"serving revision {revision}" in detail


@pytest.mark.parametrize(
    "rego, tests, data, fragment",
    [
        ("package sidecar\ndecision := := 1\n", None, None, "opa check --strict: policy.rego:2: rego_parse_error"),
        (SIMPLE_POLICY.replace('["echo", ', "["), TESTS, None, "policy_test.rego:2: data.sidecar.tests.test_echo_allowed failed"),
        (SIMPLE_POLICY, None, "tools: [unclosed\n", "data.yaml: not valid YAML"),
    ],
    ids=["does-not-compile", "fails-its-tests", "bad-data"],
)
async def test_the_first_policy_must_pass_every_step(tmp_path, service, rego, tests, data, fragment):
    directory = write_policy(tmp_path / "p", rego, tests=tests, data=data)
    with pytest.raises(PolicyRejected) as failure:
        await service(directory)
    assert any(fragment in problem for problem in failure.value.problems), failure.value.problems


async def test_bad_json_data_is_rejected_by_opa_too(tmp_path, service):
    directory = policy_dir(tmp_path)
    (directory / "sidecar" / "limits").mkdir()
    (directory / "sidecar" / "limits" / "data.json").write_text('{"max": ')
    with pytest.raises(PolicyRejected, match="data.json"):
        await service(directory)


async def test_a_missing_opa_names_the_fix(tmp_path):
    policy = PolicyService(policy_dir(tmp_path), managed=ManagedOpaOptions(binary=str(tmp_path / "no-opa")))
    with pytest.raises(OpaNotFound, match="make install"):
        await policy.start()


async def test_a_start_failing_once_opa_is_up_leaves_no_opa_running(tmp_path):
    # The client's start fails after the managed OPA answered healthy (here: a connection
    # limit no pool accepts); a cancelled start (a signal) takes the same path.
    before = opa_children()
    policy = PolicyService(policy_dir(tmp_path), OpaClientOptions(max_connections=-1), reload=False)
    with pytest.raises(ValueError):
        await policy.start()
    assert opa_children() == before


async def test_reload_swaps_good_rejects_bad_and_logs_a_return_to_the_serving_revision(tmp_path, service, caplog):
    caplog.set_level(logging.INFO, logger="sidecar.policy.opa.service")
    directory = policy_dir(tmp_path)
    policy = await service(directory)
    first = policy.revision
    first_pid = policy.runner.pid
    assert (await policy.decide(PING)).outcome == "deny"

    # Good: ping becomes allowed, served by a new OPA; the old one stops.
    (directory / "policy.rego").write_text(textwrap.dedent(SIMPLE_POLICY).replace('["echo",', '["echo", "ping",'))
    assert await policy.reload() is True
    second = policy.revision
    assert second != first
    decision = await policy.decide(PING)
    assert decision.outcome == "allow" and decision.policy_revision == second
    await wait_for(lambda: not _alive(first_pid))

    # Bad (does not compile): nothing served changes; health and the log tell why.
    (directory / "policy.rego").write_text("package sidecar\ndecision := := 1\n")
    assert await policy.reload() is False
    assert policy.revision == second and (await policy.decide(PING)).outcome == "allow"
    ready, detail = policy.ready()
    assert ready and "last reload rejected" in detail and "policy.rego:2" in detail
    assert any("rejected" in r.getMessage() and second in r.getMessage() for r in caplog.records)

    # Fails its own tests: never serves either.
    (directory / "policy.rego").write_text(textwrap.dedent(SIMPLE_POLICY).replace('["echo", ', '["ping", '))
    assert await policy.reload() is False
    assert "test_echo_allowed failed" in policy.last_reload_error
    assert (await policy.decide(INPUT)).outcome == "allow"

    # Back to the serving files: nothing to swap, and the log says so.
    (directory / "policy.rego").write_text(textwrap.dedent(SIMPLE_POLICY).replace('["echo",', '["echo", "ping",'))
    assert await policy.reload() is True
    assert policy.last_reload_error is None and policy.revision == second
    assert any("back to the serving revision" in r.getMessage() for r in caplog.records)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_calls_during_a_reload_are_all_decided(tmp_path, service):
    """Blue/green: while the new OPA starts and takes over, no call fails."""
    directory = policy_dir(tmp_path)
    policy = await service(directory)
    stop = asyncio.Event()
    decisions = []

    async def load():
        while not stop.is_set():
            decisions.append(await policy.decide(INPUT))

    workers = [asyncio.create_task(load()) for _ in range(4)]
    (directory / "policy.rego").write_text(textwrap.dedent(SIMPLE_POLICY).replace('["echo",', '["echo", "ping",'))
    assert await policy.reload() is True
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*workers)
    assert decisions and all(d.outcome == "allow" and d.error is None for d in decisions), {
        d.reasons for d in decisions if d.error
    }
    assert {d.policy_revision for d in decisions} <= {read_data(directory)[1], decisions[0].policy_revision}


async def test_the_directory_is_watched(tmp_path, service):
    directory = policy_dir(tmp_path)
    policy = await service(directory, reload=True)
    first = policy.revision
    (directory / "policy.rego").write_text(textwrap.dedent(SIMPLE_POLICY).replace('["echo",', '["echo", "ping",'))
    await wait_for(lambda: policy.revision != first)
    assert (await policy.decide(PING)).outcome == "allow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_external_opa_decides_through_the_same_client_and_catalog_comes_from_the_directory(tmp_path, service):
    directory = policy_dir(tmp_path)
    port = _free_port()
    opa = subprocess.Popen(
        [find_opa(), "run", "--server", "--addr", f"127.0.0.1:{port}", "--bundle", str(directory), "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        policy = await service(directory, url=url)
        assert not policy.managed
        decision = await decide_until(policy, "allow")
        assert decision.outcome == "allow" and decision.engine == "opa"
        assert policy.catalog.entry("echo") == {"risk": "low"}
        # The catalog follows the directory; OPA there loads its own bundle.
        (directory / "sidecar" / "catalog" / "data.yaml").write_text("tools:\n  echo: {risk: high}\n")
        assert await policy.reload() is True
        assert policy.catalog.entry("echo") == {"risk": "high"}
        opa.kill()
        opa.wait()
        denied = await policy.decide(INPUT)
        assert denied.outcome == "deny" and denied.reasons[0].startswith("policy_unavailable: OPA at " + url)
    finally:
        opa.kill()
        opa.wait()


async def decide_until(policy, outcome, timeout=30.0):  # as soon as it holds; room for a loaded machine
    deadline = time.monotonic() + timeout
    while True:
        decision = await policy.decide(INPUT)
        if decision.outcome == outcome or time.monotonic() > deadline:
            return decision
        await asyncio.sleep(0.05)


def test_catalog_data_lands_at_its_directory_path(tmp_path):
    directory = write_policy(tmp_path / "p", SIMPLE_POLICY)
    (directory / "sidecar" / "catalog").mkdir(parents=True)
    (directory / "sidecar" / "catalog" / "data.yaml").write_text("tools:\n  echo: {risk: low}\n")
    (directory / "sidecar" / "grants").mkdir()
    (directory / "sidecar" / "grants" / "data.json").write_text('[{"spiffe_id": "spiffe://x/*"}]')
    (directory / ".git").mkdir()
    (directory / ".git" / "data.json").write_text("not read")
    catalog = Catalog.read(directory)
    assert catalog.entry("echo") == {"risk": "low"} and catalog.entry("nope") is None
    data, revision = read_data(directory)
    assert data["sidecar"]["grants"] == [{"spiffe_id": "spiffe://x/*"}]
    (directory / "policy.rego").write_text((directory / "policy.rego").read_text() + "\n# changed\n")
    assert read_data(directory)[1] != revision
    with pytest.raises(CatalogError, match="does not exist"):
        Catalog.read(tmp_path / "missing")
