"""SIGKILL under concurrent load loses no acknowledged record, and the chain continues after restart.

Two forms: a child process appending straight to the log (the mechanism), and
the real sidecar serving Authorize over a unix socket, killed with -9 while
clients are mid-call (the promise: a decision an agent received is in the log).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from sidecar.evidence.log import EvidenceLog
from sidecar.evidence.verify import verify_dir
from tests.conftest import SIMPLE_POLICY, write_policy
from tests.infra.sidecar import SidecarProcess

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from sidecar.evidence.log import EvidenceLog

    log = EvidenceLog.open(sys.argv[1], instance_id="child", checkpoint_every=50, checkpoint_seconds=0,
                           key_provider=None)

    async def worker(w):
        i = 0
        while True:
            decision_id = f"w{w}-{i}"
            await log.append("decision", {"decision_id": decision_id, "outcome": "allow", "reasons": ["ok: x"]})
            print(decision_id, flush=True)
            i += 1

    async def main():
        await asyncio.gather(*(worker(w) for w in range(16)))

    asyncio.run(main())
    """
)


def logged(directory: Path) -> tuple[set[str], list[dict]]:
    records = []
    for path in sorted(directory.glob("evidence-*.jsonl")):
        for line in path.read_bytes().split(b"\n"):
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a torn last line: never acknowledged
    return {r["decision_id"] for r in records if r.get("kind") == "decision"}, records


def test_sigkill_while_appending_loses_no_acknowledged_record(tmp_path):
    directory = tmp_path / "ev"
    child = subprocess.Popen([PY, "-c", CHILD, str(directory)], stdout=subprocess.PIPE, cwd=REPO)
    acked: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while len(acked) < 400 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked.append(line.decode().strip())
        os.kill(child.pid, signal.SIGKILL)
        rest = child.stdout.read()  # acknowledged before the kill, still in the pipe
        acked.extend(rest.decode().split())
    finally:
        child.kill()
        child.wait()
    assert len(acked) >= 400, "the child did not get going"

    ids, records = logged(directory)
    missing = set(acked) - ids
    assert not missing, f"{len(missing)} acknowledged records lost, e.g. {sorted(missing)[:3]}"

    # restart: recovery cuts any torn tail, continues the chain, and the whole log verifies
    log = EvidenceLog.open(directory, instance_id="after")
    log.close()
    report = verify_dir(directory)
    assert report.ok, report.problems
    _, records = logged(directory)
    assert [r["kind"] for r in records].count("startup") == 2


@pytest.fixture
def sidecar_files(tmp_path):
    return write_sidecar_files(tmp_path)


def write_sidecar_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A dev-mode sidecar's config on a unix socket, SIMPLE_POLICY, evidence in tmp_path/ev: (config, socket, ev)."""
    policy = write_policy(tmp_path / "rego", SIMPLE_POLICY)
    socket_path = tmp_path / "s" / "sidecar.sock"
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            listen: {{tcp: "", unix: "{socket_path}"}}
            policy: {{dir: "{policy}", reload: false}}
            sidecar: {{instance_id: crash-test}}
            evidence: {{dir: "{tmp_path / 'ev'}", checkpoint_every: 100}}
            telemetry: {{exporter: none}}
            identity: {{sources: [dev]}}
            """
        )
    )
    return config, socket_path, tmp_path / "ev"


def serving_sidecar(config: Path) -> SidecarProcess:
    """The real sidecar on `config`, serving; its log beside the config (appended across restarts)."""
    sidecar = SidecarProcess(config, config.with_suffix(".log"))
    sidecar.start()
    sidecar.wait_serving()
    return sidecar


async def test_sigkill_of_the_real_sidecar_under_load_loses_no_decision_a_client_received(sidecar_files):
    from sidecar.client import AsyncClient

    config, socket_path, directory = sidecar_files
    sidecar = serving_sidecar(config)
    received: dict[str, str] = {}  # decision_id -> trace_id
    stop = asyncio.Event()
    try:
        async with AsyncClient(f"unix:{socket_path}") as client:

            async def worker(w: int) -> None:
                i = 0
                while not stop.is_set():
                    tool = "echo" if i % 2 else "not_listed"
                    try:
                        result = await client.authorize(tool, {"n": i, "w": w}, task_id=f"t{w}")
                    except (grpc.RpcError, grpc.aio.AioRpcError, ConnectionError, OSError):
                        return  # the sidecar is gone
                    received[result.decision_id] = result.trace_id
                    i += 1

            workers = [asyncio.create_task(worker(w)) for w in range(12)]
            deadline = time.monotonic() + 30
            while len(received) < 300 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            sidecar.send_signal(signal.SIGKILL)  # mid-flight: calls are still arriving
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), 15)
    finally:
        sidecar.close()
    assert len(received) >= 300

    ids, records = logged(directory)
    missing = set(received) - ids
    assert not missing, f"{len(missing)} decisions the clients received are not in the log"
    traces = {r["decision_id"]: r["trace_id"] for r in records if r.get("kind") == "decision"}
    assert all(traces[d] == t for d, t in received.items()), "the response's trace_id is the record's"

    # restart the real sidecar on the same directory: the chain continues, and verifies
    sidecar.start()
    try:
        sidecar.wait_serving()
        async with AsyncClient(f"unix:{socket_path}") as client:
            after = await client.authorize("echo", {"after": True})
        assert sidecar.stop() == 0
    finally:
        sidecar.close()
    ids, records = logged(directory)
    assert after.decision_id in ids
    assert [r["kind"] for r in records].count("startup") == 2
    report = verify_dir(directory)
    assert report.ok, report.problems
    assert records[-1]["kind"] == "checkpoint", "a clean shutdown ends with a checkpoint"
