"""A refused `agent-sidecar serve` leaves evidence.dir as it found it, whatever refused it.

Each reason a start can be refused is tried with the real CLI on two directories: none yet
(`absent`: nor its parent, where the dev key and the checkpoint mirror go), and one a sidecar
wrote and stopped cleanly (`used`: log, LOCK, escalations.db, tasks.db, with the dev key and
the mirror beside it). After the refusal every path under that parent is as it was, a file's
size, mtime and content included (a directory's own mtime aside), the exit status and message
are the documented ones (`agent-sidecar serve --help`), no process the start ran is left, and
what can refuse the start for the evidence directory does so before OPA starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from sidecar.evidence.lock import WriterLock
from tests.conftest import REGO, REPO, write_policy
from tests.infra.sidecar import SidecarProcess

EVIDENCE = Path("var") / "evidence"  # under tmp_path; the dev key and the mirror go beside it, in var/

LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, b"%d\\n" % os.getpid(), 0)
print("held", flush=True)
time.sleep(600)
"""


def settings(tmp_path: Path, **sections) -> dict:
    base = {
        "identity": {"sources": ["dev"]},
        "listen": {"tcp": "127.0.0.1:0", "unix": str(tmp_path / "sidecar.sock")},
        "metrics": {"listen": ""},
        "policy": {"dir": str(REGO), "reload": False},
        "evidence": {"dir": str(tmp_path / EVIDENCE)},
        "telemetry": {"exporter": "none"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


@pytest.fixture(scope="module")
def used_template(tmp_path_factory) -> Path:
    """var/ after a sidecar served on var/evidence and stopped cleanly (SIGTERM: exit 0)."""
    base = tmp_path_factory.mktemp("used")
    config = base / "sidecar.yaml"
    config.write_text(yaml.safe_dump(settings(base)))
    sidecar = SidecarProcess(config, base / "sidecar.log")
    sidecar.start()
    try:
        sidecar.wait_serving()
        assert sidecar.stop() == 0
    finally:
        sidecar.close()
    names = set(os.listdir(base / EVIDENCE))
    assert {"LOCK", "evidence-000001.jsonl", "escalations.db", "tasks.db"} <= names, names
    assert {"evidence-dev-key.pem", "evidence-checkpoints.jsonl"} <= set(os.listdir(base / "var"))
    return base / "var"


def prepare(tmp_path: Path, state: str, used_template: Path) -> None:
    """tmp_path/var as `state` says: absent, or a copy of the used one (mtimes kept)."""
    if state == "used":
        shutil.copytree(used_template, tmp_path / "var", copy_function=shutil.copy2)


def listing(root: Path) -> dict[str, tuple]:
    """Every path under `root`: a file's size, mtime (ns) and content digest; a directory's name only."""
    found: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")) if root.exists() else ():
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            found[str(path.relative_to(root))] = ("dir",)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else ""
            found[str(path.relative_to(root))] = ("file", info.st_size, info.st_mtime_ns, digest)
    return found


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line holds `text` (a managed OPA's holds its TMPDIR)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if text.encode() in cmdline and not zombie:
            found.append(int(entry))
    return found


async def refused(tmp_path: Path, config: dict, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `agent-sidecar serve` on `config` to its exit, with a TMPDIR of its own; (exit status, stderr),
    once its TMPDIR is found empty and no process of its start (OPA) is left."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    with tempfile.TemporaryDirectory(dir="/tmp") as tmpdir:  # short: OPA's unix socket goes under it
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "serve", "--config", str(path), cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {}), "TMPDIR": tmpdir},
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        text = err.decode()
        assert b"serving" not in out.split(b"\n", 1)[0], text
        assert os.listdir(tmpdir) == [], text
        assert processes_mentioning(tmpdir) == [], text
    assert "Traceback" not in text, text
    return process.returncode, text


def broken_policy(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "broken", "package sidecar\n\ndecision := {\n")


def last_record_damaged(var: Path) -> None:
    path = var / "evidence" / "evidence-000001.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1].replace(b'"kind":"checkpoint"', b'"kind":"checkpoinT"'))


def torn_tail(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b'{"kind":"decision","seq":')


def torn_older_file(var: Path) -> None:
    torn_tail(var / "evidence" / "evidence-000001.jsonl")
    (var / "evidence" / "evidence-000002.jsonl").write_bytes(b"")


# (id, states, sections, env, setup(tmp_path), exit status, message, refused before OPA starts)
REASONS = [
    ("a file the config names", ("absent", "used"), lambda t: {"evidence": {"signing_key": str(t / "missing.pem")}},
     {}, None, 2, "agent-sidecar: evidence.signing_key: cannot read signing key", True),
    ("spans in clear off loopback", ("absent", "used"), lambda t: {"telemetry": {"exporter": "otlp", "endpoint": ""}},
     {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability.svc:4317"}, None, 2,
     "agent-sidecar: OTEL_EXPORTER_OTLP_ENDPOINT: the evidence spans", True),
    ("identity not configured", ("absent", "used"),
     lambda t: {"identity": {"sources": ["workload_api"], "workload_api_socket": ""},
                "escalation": {"approvers": ["spiffe://example.org/approver"]}},
     {"SPIFFE_ENDPOINT_SOCKET": ""}, None, 2, "identity.workload_api_socket", True),
    ("the escalation store cannot be opened", ("absent", "used"),
     lambda t: {"escalation": {"path": str(t / "a-file" / "escalations.db")}},
     {}, lambda t: (t / "a-file").write_text("not a directory"), 2,
     "agent-sidecar: the escalation store cannot be opened", True),
    ("the task store cannot be opened", ("used",), lambda t: {}, {},
     lambda t: ((t / EVIDENCE / "tasks.db").unlink(), (t / EVIDENCE / "tasks.db").mkdir()), 2,
     "agent-sidecar: the task store cannot be opened", True),
    ("the last record is damaged", ("used",), lambda t: {}, {}, lambda t: last_record_damaged(t / "var"), 2,
     "agent-sidecar: the evidence log cannot be opened: ", True),
    ("a log file that is not a file", ("used",), lambda t: {}, {},
     lambda t: (t / EVIDENCE / "evidence-000002.jsonl").mkdir(), 2, "evidence-000002.jsonl: not a regular file", True),
    ("a torn line in an older file", ("used",), lambda t: {}, {}, lambda t: torn_older_file(t / "var"), 2,
     "ends in an unterminated line but is not the newest file", True),
    ("no OPA", ("absent", "used"), lambda t: {"policy": {"opa": {"binary": "/nonexistent/opa"}}}, {}, None, 2,
     "agent-sidecar: no OPA binary at /nonexistent/opa", False),
    ("a bundle OPA rejects", ("absent", "used"), lambda t: {"policy": {"dir": str(t / "broken")}}, {},
     broken_policy, 2, "cannot be served:", False),
    ("a shadow bundle OPA rejects", ("used",), lambda t: {"policy": {"shadow_dir": str(t / "broken")}}, {},
     broken_policy, 2, "policy.shadow_dir", False),
    ("a torn tail, then a bundle OPA rejects", ("used",), lambda t: {"policy": {"dir": str(t / "broken")}}, {},
     lambda t: (broken_policy(t), torn_tail(t / EVIDENCE / "evidence-000001.jsonl")),
     2, "cannot be served:", False),
]


@pytest.mark.parametrize("state, reason", [
    pytest.param(state, reason, id=f"{reason[0]}, {state}") for reason in REASONS for state in reason[1]
])
async def test_a_refused_start_leaves_the_evidence_directory_as_it_found_it(tmp_path, used_template, state, reason):
    _, _, sections, env, setup, code, message, before_opa = reason
    prepare(tmp_path, state, used_template)
    if setup is not None:
        setup(tmp_path)
    before = listing(tmp_path / "var")
    status, err = await refused(tmp_path, settings(tmp_path, **sections(tmp_path)), env)
    assert status == code, err
    assert message in err, err
    if before_opa:
        assert "OPA pid" not in err, err  # refused before the managed OPA started
    assert listing(tmp_path / "var") == before
    assert not (tmp_path / "sidecar.sock").exists()


@pytest.mark.parametrize("state", ["absent", "used"])
async def test_the_sockets_directories_a_refused_start_made_are_removed(tmp_path, used_template, state):
    """examples/dev.yaml's layout: the sockets in var/run beside var/evidence (make run in a fresh checkout).
    Binding them made var/run (and var); a refused start removed the evidence directory but left those."""
    prepare(tmp_path, state, used_template)
    broken_policy(tmp_path)
    before = listing(tmp_path / "var")
    config = settings(tmp_path, listen={"unix": str(tmp_path / "var" / "run" / "agent-sidecar.sock")},
                      mcp={"unix": str(tmp_path / "var" / "run" / "mcp" / "mcp.sock")},
                      policy={"dir": str(tmp_path / "broken")})
    status, err = await refused(tmp_path, config)
    assert status == 2 and "cannot be served:" in err, err
    assert listing(tmp_path / "var") == before
    assert (tmp_path / "var").exists() == (state == "used")


async def test_a_listener_in_use_refuses_before_the_evidence_directory_is_touched(tmp_path, used_template):
    shutil.copytree(used_template, tmp_path / "var", copy_function=shutil.copy2)
    before = listing(tmp_path / "var")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        status, err = await refused(tmp_path, settings(tmp_path, listen={"tcp": f"127.0.0.1:{port}"}))
    assert status == 2 and f"agent-sidecar: listen.tcp: cannot listen on 127.0.0.1:{port}" in err, err
    assert listing(tmp_path / "var") == before


async def test_a_directory_another_writer_holds_is_left_to_it(tmp_path, used_template):
    """Its LOCK keeps the holder's pid and times; nothing of the refused start is left beside it."""
    shutil.copytree(used_template, tmp_path / "var", copy_function=shutil.copy2)
    lock = tmp_path / EVIDENCE / "LOCK"
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", LOCK_HOLDER, str(lock),
                                                  stdout=asyncio.subprocess.PIPE)
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"held\n"
        before = listing(tmp_path / "var")
        status, err = await refused(tmp_path, settings(tmp_path))
        assert status == 2 and f"is in use by another evidence writer (pid {holder.pid})" in err, err
        assert "OPA pid" not in err, err
        assert listing(tmp_path / "var") == before
        assert lock.read_text() == f"{holder.pid}\n"
        assert holder.returncode is None
    finally:
        holder.kill()
        await holder.wait()


SLOW_OPA = """#!/bin/sh
# OPA, whose server takes a while to come up: a signal can reach the sidecar while it waits.
if [ "$1" = run ]; then echo "slow-opa: starting" >&2; sleep 3; fi
exec {opa} "$@"
"""


def slow_opa(tmp_path: Path) -> Path:
    wrapper = tmp_path / "slow-opa"
    wrapper.write_text(SLOW_OPA.format(opa=shutil.which("opa")))
    wrapper.chmod(0o755)
    return wrapper


async def started(tmp_path: Path, config: dict, tmpdir: str) -> asyncio.subprocess.Process:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "--config", str(path), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "TMPDIR": tmpdir},
    )


async def read_until(stream: asyncio.StreamReader, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        line = await asyncio.wait_for(stream.readline(), 60)
        assert line, seen.decode()  # it exited first
        seen += line
    return seen


@pytest.mark.parametrize("state", ["absent", "used"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_while_opa_starts_leaves_the_evidence_directory_as_it_found_it(tmp_path, used_template, state,
                                                                                       signum):
    """The log was read back and the stores opened before OPA; nothing is written until after it."""
    prepare(tmp_path, state, used_template)
    before = listing(tmp_path / "var")
    config = settings(tmp_path, policy={"opa": {"binary": str(slow_opa(tmp_path))}})
    with tempfile.TemporaryDirectory(dir="/tmp") as tmpdir:
        sidecar = await started(tmp_path, config, tmpdir)
        err = await read_until(sidecar.stderr, b"slow-opa: starting")
        sidecar.send_signal(signum)
        out, rest = await asyncio.wait_for(sidecar.communicate(), 30)
        err = (err + rest).decode()
        assert sidecar.returncode == 128 + signum, err
        assert f"agent-sidecar: {signal.Signals(signum).name} while starting: stopped; nothing was left running" in err
        assert b"serving" not in out and "Traceback" not in err, err
        assert os.listdir(tmpdir) == [] and processes_mentioning(tmpdir) == [], err
    assert listing(tmp_path / "var") == before


async def test_a_signal_once_the_startup_record_is_written_is_a_stop(tmp_path, used_template):
    """The start has committed: it serves, then stops as a serving sidecar does (exit 0), its log
    ending in a closing checkpoint; LOCK keeps its pid."""
    shutil.copytree(used_template, tmp_path / "var", copy_function=shutil.copy2)
    log = tmp_path / EVIDENCE / "evidence-000001.jsonl"
    records = len(log.read_bytes().splitlines())
    with tempfile.TemporaryDirectory(dir="/tmp") as tmpdir:
        sidecar = await started(tmp_path, settings(tmp_path), tmpdir)
        while len(log.read_bytes().splitlines()) == records:  # until its startup record is there
            assert sidecar.returncode is None
            await asyncio.sleep(0.001)
        sidecar.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(sidecar.communicate(), 30)
        assert sidecar.returncode == 0, err.decode()
        assert f"agent-sidecar {sidecar.pid} serving".encode() in out
    kinds = [json.loads(line)["kind"] for line in log.read_bytes().splitlines()[records:]]
    assert kinds[0] == "startup" and kinds[-1] == "checkpoint", kinds
    assert (tmp_path / EVIDENCE / "LOCK").read_text() == f"{sidecar.pid}\n"


def test_a_lock_released_before_keep_is_put_back_as_found(tmp_path):
    directory = tmp_path / "evidence"
    directory.mkdir()
    (directory / "LOCK").write_bytes(b"4242\n")
    os.utime(directory / "LOCK", ns=(1_000_000_000, 2_000_000_000))
    before = listing(directory)
    lock = WriterLock.take(directory)
    assert (directory / "LOCK").read_text() == f"{os.getpid()}\n"
    lock.release()
    assert listing(directory) == before
    kept = WriterLock.take(directory)
    kept.keep()
    kept.release()
    assert (directory / "LOCK").read_text() == f"{os.getpid()}\n"


async def test_a_writer_waiting_on_a_lock_file_a_refused_start_removed_does_not_hold_the_directory(tmp_path):
    """The refused start created LOCK and removes it, still holding it. The waiter's flock is then granted on
    the removed file: it must take the LOCK that is there now, so no third writer can hold it alongside."""
    directory = tmp_path / "evidence"
    refused_start = WriterLock.take(directory)  # creates LOCK
    waiting = asyncio.create_task(WriterLock.acquire(directory, wait_seconds=30))
    await asyncio.sleep(0.3)  # it polls the LOCK it opened
    assert not waiting.done()
    refused_start.release()  # not kept: LOCK removed
    waiter = await asyncio.wait_for(waiting, 10)
    try:
        assert (directory / "LOCK").read_text() == f"{os.getpid()}\n"
        with pytest.raises(Exception, match="is in use by another evidence writer"):
            WriterLock.take(directory)
    finally:
        waiter.release()
    assert not directory.joinpath("LOCK").exists()  # the waiter, never kept, created it: gone too


async def test_a_full_volume_refuses_the_start_at_the_lock_and_leaves_no_directory(tmp_path, tiny_volume):
    """LOCK cannot take the starting sidecar's pid: refused (the evidence log cannot be opened), with the
    directory it made and the empty LOCK removed again, before OPA."""
    tiny_volume.fill()
    before = listing(tiny_volume.path)
    config = settings(tmp_path, evidence={"dir": str(tiny_volume.path / EVIDENCE)})
    status, err = await refused(tmp_path, config)
    assert status == 2, err
    assert f"agent-sidecar: the evidence log cannot be opened: cannot open evidence log in {tiny_volume.path / EVIDENCE}: " \
           "No space left on device" in err, err
    assert "OPA pid" not in err, err
    assert listing(tiny_volume.path) == before
