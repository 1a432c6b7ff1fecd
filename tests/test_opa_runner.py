"""OpaRunner with the real `opa` binary: start, health, restart after death, never orphaned."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.policy.opa.client import OpaClient
from sidecar.policy.opa.runner import OpaNotFound, OpaRunner, OpaRunOptions, OpaStartError, find_opa
from sidecar.policy.opa import runner as runner_module
from tests.conftest import REPO, SIMPLE_POLICY, write_policy
from tests.test_opa_client import stop

INPUT = {"version": "sidecar/v1", "tool": {"name": "echo", "arguments": {}}}


@pytest.fixture
def socket_dir(tmp_path_factory) -> Path:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp paths can be longer.
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="opa-t-"))
    yield directory
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


def options(bundle: Path, socket_dir: Path, **overrides) -> OpaRunOptions:
    settings = dict(binary=find_opa(), bundle=bundle, socket=socket_dir / "opa.sock", restart_backoff_seconds=0.05)
    settings.update(overrides)
    return OpaRunOptions(**settings)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): read its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


def test_arguments_come_from_the_options(tmp_path):
    rendered = OpaRunOptions(binary="/x/opa", bundle=tmp_path / "b.tar.gz", socket=Path("/s/opa.sock")).argv()
    assert rendered[:3] == ["/x/opa", "run", "--server"]
    assert rendered[rendered.index("--addr") + 1] == "unix:///s/opa.sock"
    assert rendered[rendered.index("--bundle") + 1] == str(tmp_path / "b.tar.gz")
    assert rendered[rendered.index("--log-format") + 1] == "json"
    assert rendered[rendered.index("--unix-socket-perm") + 1] == "600"
    assert "--optimize-store-for-read-speed" in rendered  # the bundle's data is read by every decision


def test_a_missing_binary_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(runner_module, "CHECKOUT_TOOLS", tmp_path / "no-tools")
    with pytest.raises(OpaNotFound, match="make install"):
        find_opa("opa")
    with pytest.raises(OpaNotFound, match=f"no OPA binary at {tmp_path}/nope"):
        find_opa(str(tmp_path / "nope"))


def test_outside_make_the_checkouts_pinned_opa_is_found(tmp_path, monkeypatch):
    """PATH without .tools/bin (a new terminal): a bare name falls back to the OPA `make install` built."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_opa("opa") == str(runner_module.CHECKOUT_TOOLS / "opa")
    with pytest.raises(OpaNotFound):  # a path is taken as given
        find_opa(str(tmp_path / "opa"))


async def test_starts_healthy_decides_and_stops_its_process_group(tmp_path, socket_dir):
    bundle = write_policy(tmp_path / "p", SIMPLE_POLICY)
    async with OpaRunner(options(bundle, socket_dir)) as runner:
        pid = runner.pid
        assert runner.health()[0] and runner.url == f"unix://{socket_dir / 'opa.sock'}"
        assert os.getpgid(pid) == pid  # its own process group
        async with OpaClient(runner.url) as client:
            assert (await client.decide(INPUT)).outcome == "allow"
            assert client.ready()[0]
    assert not alive(pid)
    assert not (socket_dir / "opa.sock").exists()
    assert not runner.health()[0]


def environment_of(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)


@pytest.mark.parametrize("gogc,expected", [(400, "400"), (0, None)])
async def test_gogc_reaches_opas_go_runtime_only_when_set(tmp_path, socket_dir, monkeypatch, gogc, expected):
    monkeypatch.delenv("GOGC", raising=False)
    bundle = write_policy(tmp_path / "p", SIMPLE_POLICY)
    async with OpaRunner(options(bundle, socket_dir, gogc=gogc)) as runner:
        assert environment_of(runner.pid).get("GOGC") == expected
        async with OpaClient(runner.url) as client:
            assert (await client.decide(INPUT)).outcome == "allow"


def scheduling_policies(pid: int) -> set[int]:
    """The scheduling policy of every thread of `pid` (os.SCHED_*) that is still there once asked."""
    policies = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            policies.add(os.sched_getscheduler(int(task.name)))
        except ProcessLookupError:  # that thread ended since the listing
            continue
    return policies


@pytest.mark.parametrize("batch, policy", [(True, os.SCHED_BATCH), (False, os.SCHED_OTHER)])
async def test_batch_scheduling_reaches_every_opa_thread_and_survives_a_restart(tmp_path, socket_dir, batch, policy):
    bundle = write_policy(tmp_path / "p", SIMPLE_POLICY)
    async with OpaRunner(options(bundle, socket_dir, batch_scheduling=batch)) as runner:
        async with OpaClient(runner.url) as client:
            assert (await client.decide(INPUT)).outcome == "allow"  # its serving threads exist by now
            first = runner.pid
            assert scheduling_policies(first) == {policy}
            os.kill(first, signal.SIGKILL)
            await wait_until(lambda: runner.pid != first and runner.health()[0])
            assert (await client.decide(INPUT)).outcome == "allow"
            assert scheduling_policies(runner.pid) == {policy}


async def test_a_bundle_that_does_not_compile_fails_the_start_with_opas_message(tmp_path, socket_dir):
    bundle = write_policy(tmp_path / "p", "package sidecar\ndecision := := 1\n")
    with pytest.raises(OpaStartError, match="exited with status") as failure:
        await OpaRunner(options(bundle, socket_dir)).start()
    assert "policy.rego:2" in str(failure.value)


async def test_opa_killed_is_restarted_and_calls_recover(tmp_path, socket_dir, caplog):
    bundle = write_policy(tmp_path / "p", SIMPLE_POLICY)
    async with OpaRunner(options(bundle, socket_dir)) as runner:
        async with OpaClient(runner.url) as client:
            first = runner.pid
            os.kill(first, signal.SIGKILL)
            await wait_until(lambda: not runner.health()[0] or runner.pid != first)
            denied = await client.decide(INPUT)
            if runner.pid == first:  # not restarted yet: the call meanwhile is a deny naming OPA
                assert denied.outcome == "deny" and denied.error and "OPA at" in denied.reasons[0]
            await wait_until(lambda: runner.restarts == 1 and runner.health()[0])
            assert runner.pid != first and alive(runner.pid)
            await wait_until(lambda: client.breaker.state != "open")
            assert (await client.decide(INPUT)).outcome == "allow"
    assert any("exited with status" in r.getMessage() for r in caplog.records)


async def test_a_hung_opa_is_killed_and_replaced_and_calls_recover_without_sigcont(tmp_path, socket_dir, caplog):
    bundle = write_policy(tmp_path / "p", SIMPLE_POLICY)
    async with OpaRunner(options(bundle, socket_dir, liveness_timeout_seconds=0.5)) as runner:
        async with OpaClient(runner.url) as client:
            first = runner.pid
            os.kill(first, signal.SIGSTOP)  # never resumed by the test
            try:
                await wait_until(lambda: runner.restarts == 1 and runner.health()[0])
            finally:
                if alive(first):  # only if the runner failed to kill it
                    os.kill(first, signal.SIGKILL)
                    os.kill(first, signal.SIGCONT)
            assert runner.pid != first and alive(runner.pid) and not alive(first)
            await wait_until(lambda: client.breaker.state != "open")
            assert (await client.decide(INPUT)).outcome == "allow"
    hung = [r.getMessage() for r in caplog.records if f"OPA pid {first} hung: GET /health" in r.getMessage()]
    assert hung and "killing its process group" in hung[0], hung


async def test_without_liveness_a_stopped_opa_is_not_replaced(tmp_path, socket_dir):
    bundle = write_policy(tmp_path / "p", SIMPLE_POLICY)
    async with OpaRunner(options(bundle, socket_dir, health_timeout_seconds=0.2)) as runner:
        async with OpaClient(runner.url) as client:
            first = runner.pid
            stop(first)  # every thread stopped before the call: kill() returns before the stop is complete
            try:
                denied = await client.decide(INPUT)  # answers only once OPA runs again
                assert denied.outcome == "deny" and "OPA at" in denied.reasons[0]
                # Longer than the default liveness timeout would allow, measured by OPA's own
                # state: it is still the same stopped process.
                await asyncio.sleep(1.0)
                assert runner.pid == first and alive(first) and runner.restarts == 0
            finally:
                os.kill(first, signal.SIGCONT)
            await wait_until(lambda: client.breaker.state != "open")
            assert (await client.decide(INPUT)).outcome == "allow" and runner.pid == first


async def test_opa_log_lines_reach_our_logger(tmp_path, socket_dir, caplog):
    bundle = write_policy(tmp_path / "p", SIMPLE_POLICY)
    caplog.set_level("DEBUG", logger="sidecar.policy.opa.runner")
    async with OpaRunner(options(bundle, socket_dir, log_level="info")) as runner:
        pid = runner.pid
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"opa[{pid}]: ")]
    assert any("Initializing server" in line or "Starting server" in line or "Shutting down" in line for line in lines), lines


SIDECAR = """
import asyncio, sys
from pathlib import Path
from sidecar.policy.opa.runner import OpaRunner, OpaRunOptions, find_opa
async def main():
    runner = OpaRunner(OpaRunOptions(binary=find_opa(), bundle=Path(sys.argv[1]), socket=Path(sys.argv[2])))
    await runner.start()
    print(runner.pid, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_opa_does_not_outlive_a_sidecar_killed_with_sigkill(tmp_path, socket_dir):
    bundle = write_policy(tmp_path / "p", SIMPLE_POLICY)
    process = subprocess.Popen(
        [sys.executable, "-c", SIDECAR, str(bundle), str(socket_dir / "opa.sock")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        opa_pid = int(process.stdout.readline())
        assert alive(opa_pid)
        process.kill()  # SIGKILL: no cleanup code runs in the sidecar
        process.wait(timeout=10)
        deadline = time.monotonic() + 30  # as soon as it is gone; room for a loaded machine
        while alive(opa_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(opa_pid):
            os.kill(opa_pid, signal.SIGKILL)
            raise AssertionError(f"OPA {opa_pid} outlived its SIGKILLed sidecar")
    finally:
        if process.poll() is None:
            process.kill()
