"""Who can read the sidecar's SQLite files: their owner and group, never others.

The evidence log is written 0640 and never holds a secret in clear; escalations.db holds the
arguments of every pending call in full (an approver reads them exactly as the tool will receive
them, api tokens included). It was created 0644 under the usual umask 022, with its -wal and -shm
files too, as was tasks.db: any local user of a host running the sidecar (the single-node
default: SQLite in the evidence directory) could read every escalated call's secrets.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sidecar.client import AsyncClient
from sidecar.sqlitedb import database_files
from tests.doubles.escalation import make_config

SECRET = "s3cret-token-0f4e2a"
EMAIL = {"to": "cfo@example.com", "body": "Q3", "api_token": SECRET}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


async def test_the_stores_are_not_readable_by_others(tmp_path, running_sidecar, usual_umask):
    config = make_config(tmp_path)
    sidecar = await running_sidecar(config)
    async with AsyncClient(sidecar.addresses[0]) as agent:
        assert (await agent.authorize("send_email", EMAIL, task_id="t-f")).outcome == "escalate"
    files = [*database_files(Path(config.escalation.path)), *database_files(Path(config.evidence.dir) / "tasks.db")]
    # why it matters: the store holds the secret in clear (the evidence log does not)
    assert any(SECRET.encode() in f.read_bytes() for f in files[:3])
    for path in files:
        assert path.exists(), path
        assert _mode(path) & 0o007 == 0, f"{path.name} is {oct(_mode(path))}"


async def test_a_store_left_readable_by_an_earlier_start_is_closed(tmp_path, running_sidecar, usual_umask):
    config = make_config(tmp_path)
    db = Path(config.escalation.path)
    sidecar = await running_sidecar(config)
    await sidecar.stop(grace=0)
    for path in database_files(db):
        if path.exists():
            os.chmod(path, 0o644)
    again = await running_sidecar(config)
    async with AsyncClient(again.addresses[0]) as agent:
        assert (await agent.authorize("send_email", EMAIL, task_id="t-g")).outcome == "escalate"
    for path in database_files(db):
        if path.exists():
            assert _mode(path) == 0o640, f"{path.name} is {oct(_mode(path))}"
