"""Evidence outlives the pod (issue 14 item 2; docs/deploy.md "Evidence that outlives the pod").

The example runs the agent as a StatefulSet with one PersistentVolumeClaim per
pod, mounted where the config in deploy/k8s/agent/sidecar.yaml puts
`evidence.dir`. A rolling update or a restart replaces the pod; the new
sidecar opens the same directory. These tests run real `agent-sidecar serve`
processes (and a managed OPA each) on one directory, with the example config:

- a new sidecar started while the old one still serves waits for the
  one-writer lock (`evidence.lock_wait_seconds`), the old one drains on
  SIGTERM, the lock hands over, the chain continues, and `evidence verify`
  (the CLI) passes over both lives;
- a sidecar SIGKILLed mid-life is replaced in the same way (the kernel drops
  its lock), and nothing acknowledged is lost.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.client import Client
from sidecar.config import load_config
from tests.conftest import REGO, REPO
from tests.infra.sidecar import SidecarProcess

SIDECAR_YAML = REPO / "deploy" / "k8s" / "agent" / "sidecar.yaml"
STATEFULSET = REPO / "deploy" / "k8s" / "agent" / "statefulset.yaml"


def pod_volume_config(tmp_path: Path, volume: Path, name: str) -> tuple[Path, Path]:
    """The example's sidecar.yaml with what differs on a laptop: the PVC is `volume`, no SPIRE/collector, a local OPA."""
    config = yaml.safe_load(SIDECAR_YAML.read_text())
    evidence_in_pod = Path(config["evidence"]["dir"])
    assert evidence_in_pod.is_relative_to("/var/lib/agent-sidecar"), "evidence.dir must be on the PVC's mount"
    socket_dir = Path(tempfile.mkdtemp(prefix=f"ev-{name}-", dir="/tmp"))  # the pod's own emptyDir
    config["listen"] = {"tcp": "", "unix": str(socket_dir / "sidecar.sock")}
    config["policy"] = {"dir": str(REGO), "reload": False}  # a managed OPA on rego/ stands in for the OPA container
    config["identity"] = {"sources": ["dev"]}
    config["telemetry"] = {"exporter": "none"}
    config["escalation"] = {**config.get("escalation", {}), "store": "sqlite", "path": str(tmp_path / f"{name}-esc.db")}
    config["usage"] = {"store": "memory"}
    config["evidence"]["dir"] = str(volume / evidence_in_pod.relative_to("/var/lib/agent-sidecar"))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    load_config(path)  # the real loader accepts it
    return path, socket_dir / "sidecar.sock"


class Sidecar(SidecarProcess):
    """One `agent-sidecar serve` process on a pod's config, started at once; a call through it."""

    def __init__(self, config: Path, socket_path: Path, log: Path):
        super().__init__(config, log)
        self.socket_path = socket_path
        self.start()

    def call(self, n: int) -> str:
        with Client(f"unix:{self.socket_path}") as client:
            return client.authorize("search_docs", {"query": f"q{n}"}, task_id="t").decision_id


def answers(socket_path: Path) -> bool:
    """Whether a gRPC server answers a health check on `socket_path` within a second."""
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return True


def records(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def evidence_verify(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", "evidence", "verify", str(directory)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture
def volume(tmp_path):
    path = tmp_path / "pvc"  # the agent pod's PersistentVolumeClaim
    path.mkdir()
    return path


def test_the_manifest_waits_longer_for_the_lock_than_the_old_pod_may_drain():
    config = load_config(SIDECAR_YAML)
    stateful = yaml.safe_load(STATEFULSET.read_text())
    grace = stateful["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert config.evidence.lock_wait_seconds > grace


def test_a_replacement_waits_for_the_draining_sidecar_then_continues_the_chain(tmp_path, volume):
    config_a, socket_a = pod_volume_config(tmp_path, volume, "old")
    config_b, socket_b = pod_volume_config(tmp_path, volume, "new")
    directory = Path(load_config(config_a).evidence.dir)
    old = Sidecar(config_a, socket_a, tmp_path / "old.log")
    new = None
    try:
        old.wait_serving()
        before = [old.call(n) for n in range(5)]
        # The replacement starts on the same volume while the old sidecar still serves.
        new = Sidecar(config_b, socket_b, tmp_path / "new.log")
        new.wait_for(lambda: "waiting up to" in new.text(), "the new sidecar waiting for the lock")
        # Its listeners are bound first (a taken one refuses the start before anything is written), but
        # nothing answers on them until it has the log.
        assert answers(socket_a)
        assert socket_b.exists() and not answers(socket_b), "the new sidecar serves while the old one holds the log"
        during = [old.call(n) for n in range(5, 8)]  # the old one still records while the new one waits
        assert old.stop() == 0  # drains: closes the log with a checkpoint, releases the lock
        new.wait_serving()
        after = [new.call(n) for n in range(8, 11)]
        assert new.stop() == 0
    finally:
        if new is not None:
            new.close()
        old.close()
    logged = records(directory)
    kinds = [r["kind"] for r in logged]
    assert kinds.count("startup") == 2
    (old_start, new_start) = [i for i, k in enumerate(kinds) if k == "startup"]
    assert kinds[new_start - 1] == "checkpoint", "the old sidecar closed the log before the new one wrote"
    decisions = [r["decision_id"] for r in logged if r["kind"] == "decision"]
    assert decisions == before + during + after, "every acknowledged decision, in order, once"
    done = evidence_verify(directory)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_replacement_after_a_sigkill_takes_the_lock_and_loses_nothing(tmp_path, volume):
    config_a, socket_a = pod_volume_config(tmp_path, volume, "old")
    config_b, socket_b = pod_volume_config(tmp_path, volume, "new")
    directory = Path(load_config(config_a).evidence.dir)
    old = Sidecar(config_a, socket_a, tmp_path / "old.log")
    try:
        old.wait_serving()
        before = [old.call(n) for n in range(5)]
    finally:
        old.stop(signal.SIGKILL)  # the node died: no drain, no checkpoint
        old.close()
    new = Sidecar(config_b, socket_b, tmp_path / "new.log")
    try:
        new.wait_serving()
        after = [new.call(n) for n in range(5, 8)]
        assert new.stop() == 0
    finally:
        new.close()
    assert "waiting up to" not in new.text(), "a dead writer's lock is free at once"
    logged = records(directory)
    assert [r["decision_id"] for r in logged if r["kind"] == "decision"] == before + after
    done = evidence_verify(directory)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_second_live_writer_is_refused_after_the_wait(tmp_path, volume):
    config_a, socket_a = pod_volume_config(tmp_path, volume, "old")
    config_b, _ = pod_volume_config(tmp_path, volume, "new")
    settings = yaml.safe_load(config_b.read_text())
    settings["evidence"]["lock_wait_seconds"] = 1
    config_b.write_text(yaml.safe_dump(settings))
    old = Sidecar(config_a, socket_a, tmp_path / "old.log")
    try:
        old.wait_serving()
        done = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--config", str(config_b)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        assert f"in use by another evidence writer (pid {old.pid}) after waiting 1 s" in done.stderr
        old.call(0)  # the first writer is untouched
        assert old.stop() == 0
    finally:
        old.close()
    assert evidence_verify(Path(load_config(config_a).evidence.dir)).returncode == 0
