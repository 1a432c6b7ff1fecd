"""A refused `agent-sidecar serve` leaves nothing behind.

A config problem the start can find without starting anything is found first: a file it
names that cannot be read, a listener another server holds (listen.tcp, listen.unix,
metrics.listen, mcp.listen, mcp.unix), the evidence directory locked by another writer, a
store that cannot be opened. No OPA, no `startup` record or checkpoint, no generated dev key,
no span export. A refusal found later (a policy OPA rejects) still removes everything the
start made, the managed OPA's `sidecar-opa-<pid>-*` directory included; so does a SIGINT or
SIGTERM while it starts (exit 130 or 143). Each case runs the real CLI, with its own TMPDIR
so what it leaves there can be seen. What each refusal leaves in evidence.dir, and a signal
while OPA starts: tests/test_cli_start_evidence_dir.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
import time

import pytest
import yaml

from sidecar.client import AsyncClient
from tests.conftest import REGO, REPO
from tests.infra.sidecar import SidecarProcess


def settings(tmp_path, **sections) -> dict:
    base = {
        "identity": {"sources": ["dev"]},
        "listen": {"tcp": "127.0.0.1:0", "unix": str(tmp_path / "sidecar.sock")},
        "metrics": {"listen": ""},
        "policy": {"dir": str(REGO), "reload": False},
        "evidence": {"dir": str(tmp_path / "evidence")},
        "telemetry": {"exporter": "otlp", "endpoint": "http://127.0.0.1:9"},  # a span export would be tried
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


async def serve(tmp_path, config: dict, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`agent-sidecar serve` with a TMPDIR of its own (and `env` added to its environment); (exit status,
    stderr, what is left in that TMPDIR)."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    with tempfile.TemporaryDirectory(dir="/tmp") as tmpdir:  # short: OPA's unix socket goes under it
        code, err = await _run(path, tmpdir, env or {})
        return code, err, sorted(os.listdir(tmpdir))


async def _run(path, tmpdir: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "--config", str(path), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {}), "TMPDIR": str(tmpdir)},
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, err.decode()


@pytest.mark.parametrize("section, values, message", [
    ("escalation", {"webhook_url": "http://127.0.0.1:9/hook", "webhook_secret_file": "{tmp}/missing"},
     "escalation.webhook_secret_file: cannot read {tmp}/missing"),
    ("escalation", {"webhook_url": "http://127.0.0.1:9/hook", "webhook_secret_file": "{tmp}/short"},
     "escalation.webhook_secret_file: {tmp}/short holds 3 bytes"),
    ("evidence", {"signing_key": "{tmp}/missing"}, "evidence.signing_key: cannot read signing key {tmp}/missing"),
    ("evidence", {"signing_key": "{tmp}/short"}, "evidence.signing_key: {tmp}/short: not an unencrypted PEM"),
    ("policy", {"shadow_dir": "{tmp}/missing"}, "policy.shadow_dir: {tmp}/missing: no such directory"),
])
async def test_a_file_the_config_names_is_checked_before_anything_starts(tmp_path, section, values, message):
    (tmp_path / "short").write_text("abc")
    values = {key: value.replace("{tmp}", str(tmp_path)) for key, value in values.items()}
    code, err, left = await serve(tmp_path, settings(tmp_path, **{section: values}))
    assert code == 2, err
    assert f"agent-sidecar: {message.replace('{tmp}', str(tmp_path))}" in err
    assert "OPA" not in err and "Traceback" not in err, err  # refused before the policy stage
    assert not (tmp_path / "evidence").exists()  # no startup record, no checkpoint
    assert not (tmp_path / "evidence-dev-key.pem").exists() and not (tmp_path / "evidence-checkpoints.jsonl").exists()
    assert left == []


def logged(directory) -> list[str]:
    """The evidence files in `directory` (a `startup` record would be in one)."""
    return sorted(p.name for p in directory.glob("evidence-*.jsonl")) if directory.exists() else []


async def test_a_locked_evidence_directory_is_refused_before_opa_starts(tmp_path, running_sidecar, sidecar_config):
    holder = await running_sidecar(sidecar_config(**{"evidence.dir": str(tmp_path / "evidence")}))
    assert holder.recorder is not None
    before = (tmp_path / "evidence" / "evidence-000001.jsonl").read_bytes()
    config = settings(tmp_path, listen={"unix": str(tmp_path / "second.sock")}, telemetry={"exporter": "none"})
    code, err, left = await serve(tmp_path, config)
    assert code == 2, err
    assert "is in use by another evidence writer" in err
    assert "serving revision" not in err, err  # no managed OPA was started
    assert left == []
    assert not (tmp_path / "second.sock").exists()  # its own listener, bound first, is gone again
    assert (tmp_path / "evidence" / "evidence-000001.jsonl").read_bytes() == before


def holding(kind: str, where) -> socket.socket:
    """A listening socket another program holds: TCP on 127.0.0.1 (any port), or unix at `where`."""
    if kind == "tcp":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(where))
    sock.listen(1)
    return sock


@pytest.mark.parametrize("key", ["listen.tcp", "listen.unix", "metrics.listen", "mcp.listen", "mcp.unix"])
async def test_a_listener_another_server_holds_refuses_the_start_before_anything_is_written(tmp_path, key):
    """Every listener is bound before OPA starts and before the `startup` record: a taken one is a
    ConfigError naming its key (exit 2), the ones bound before it are let go, the holder keeps its own."""
    theirs = tmp_path / "theirs.sock"
    held = holding("unix" if key.endswith("unix") else "tcp", theirs)
    with held:
        taken = str(theirs) if key.endswith("unix") else "127.0.0.1:%d" % held.getsockname()[1]
        ours = {"listen.tcp": "127.0.0.1:0", "listen.unix": str(tmp_path / "own.sock"), "metrics.listen": "127.0.0.1:0",
                "mcp.listen": "127.0.0.1:0", "mcp.unix": str(tmp_path / "own-mcp.sock")}
        ours[key] = taken
        section, _, name = key.partition(".")
        config = settings(tmp_path, telemetry={"exporter": "none"},
                          listen={"tcp": ours["listen.tcp"], "unix": ours["listen.unix"]},
                          metrics={"listen": ours["metrics.listen"]},
                          mcp={"listen": ours["mcp.listen"], "unix": ours["mcp.unix"]})
        config[section][name] = taken
        code, err, left = await serve(tmp_path, config)
        assert code == 2, err
        assert f"agent-sidecar: {key}: " in err and taken in err and "Traceback" not in err, err
        assert "serving revision" not in err and left == [], err  # no OPA
        assert not (tmp_path / "evidence").exists()  # no lock taken, no startup record, no store
        assert not (tmp_path / "own.sock").exists() and not (tmp_path / "own-mcp.sock").exists()
        if key.endswith("unix"):
            assert theirs.is_socket()  # not removed: its server still answers there
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(theirs))


@pytest.mark.parametrize("store", ["escalation", "task"])
async def test_a_store_that_cannot_be_opened_is_refused_before_the_startup_record(tmp_path, store):
    """escalation.path under a file; tasks.db (in evidence.dir) a directory."""
    escalation = {}
    if store == "escalation":
        (tmp_path / "a-file").write_text("not a directory")
        escalation = {"path": str(tmp_path / "a-file" / "escalations.db")}
    else:
        (tmp_path / "evidence" / "tasks.db").mkdir(parents=True)
    config = settings(tmp_path, telemetry={"exporter": "none"}, escalation=escalation)
    code, err, left = await serve(tmp_path, config)
    assert code == 2, err
    assert f"agent-sidecar: the {store} store cannot be opened" in err, err
    assert "serving revision" not in err and left == [], err
    assert logged(tmp_path / "evidence") == []


async def test_a_tcp_port_another_sidecar_listens_on_is_refused(tmp_path, running_sidecar, sidecar_config):
    """grpc core sets SO_REUSEPORT by default: a second sidecar would have bound the same port and taken a
    share of the first one's calls. It is refused, naming the key, and leaves nothing behind."""
    first = await running_sidecar(sidecar_config(**{"listen.unix": ""}))
    port = first.addresses[0].rsplit(":", 1)[1]
    code, err, left = await serve(tmp_path, settings(tmp_path, listen={"tcp": f"127.0.0.1:{port}", "unix": ""},
                                                     telemetry={"exporter": "none"},
                                                     evidence={"dir": str(tmp_path / "second")}))
    assert code == 2, err
    assert f"agent-sidecar: listen.tcp: cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err, err
    assert left == []
    async with AsyncClient(first.addresses[0]) as client:  # the first one still has all its callers
        assert (await client.authorize("search_docs", {"query": "x"})).outcome == "allow"


async def test_a_unix_socket_a_server_answers_on_is_not_taken_over(tmp_path, running_sidecar, sidecar_config):
    """The start used to unlink any file at listen.unix and bind anew, taking a running sidecar's callers."""
    first = await running_sidecar(sidecar_config(**{"listen.tcp": ""}))
    socket_path = first.addresses[0].removeprefix("unix:")
    code, err, _ = await serve(tmp_path, settings(tmp_path, listen={"tcp": "", "unix": socket_path},
                                                  telemetry={"exporter": "none"},
                                                  evidence={"dir": str(tmp_path / "second")}))
    assert code == 2, err
    assert f"agent-sidecar: listen.unix: {socket_path} is in use: a server is listening on it" in err, err
    async with AsyncClient(first.addresses[0]) as client:
        assert (await client.authorize("search_docs", {"query": "x"})).outcome == "allow"


async def test_listen_unix_naming_a_file_that_is_not_a_socket_leaves_it_alone(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    code, err, left = await serve(tmp_path, settings(tmp_path, listen={"tcp": "", "unix": str(precious)},
                                                     telemetry={"exporter": "none"}))
    assert code == 2, err
    assert f"agent-sidecar: listen.unix: {precious} exists and is not a socket; not removing it" in err, err
    assert precious.read_text() == "keep me"
    assert left == []


async def test_a_socket_file_left_by_a_killed_sidecar_is_replaced(tmp_path):
    """Nobody answers on it: it is removed and the new sidecar serves there."""
    import socket

    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as left_behind:
        left_behind.bind(str(stale))  # bound, never listening, closed: what a SIGKILL leaves
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump(settings(tmp_path, listen={"tcp": "", "unix": str(stale)},
                                              telemetry={"exporter": "none"})))
    sidecar = SidecarProcess(config, tmp_path / "sidecar.log")
    sidecar.start()
    try:
        await asyncio.to_thread(sidecar.wait_serving)
        async with AsyncClient(f"unix:{stale}") as client:
            assert (await client.authorize("search_docs", {"query": "x"})).outcome == "allow"
        assert sidecar.stop() == 0
    finally:
        sidecar.close()


async def test_the_mcp_gateways_listeners_are_not_taken_over_either(tmp_path, running_sidecar, sidecar_config):
    """The same rule for mcp.unix (it too unlinked whatever was there) and mcp.listen."""
    first = await running_sidecar(sidecar_config())
    tcp, unix = first.addresses[0], first.addresses[1].removeprefix("unix:")
    for mcp, message in (({"unix": unix}, f"mcp.unix: {unix} is in use: a server is listening on it"),
                         ({"listen": tcp}, f"mcp.listen: cannot listen on {tcp}")):
        code, err, left = await serve(tmp_path, settings(tmp_path, listen={"tcp": "", "unix": str(tmp_path / "own.sock")},
                                                         telemetry={"exporter": "none"}, mcp=mcp,
                                                         evidence={"dir": str(tmp_path / "second")}))
        assert code == 2, err
        assert f"agent-sidecar: {message}" in err and "Traceback" not in err, err
        assert left == []
    async with AsyncClient(first.addresses[1]) as client:
        assert (await client.authorize("search_docs", {"query": "x"})).outcome == "allow"


@pytest.mark.parametrize("section, values, key", [
    ("mcp", {"upstreams": {"docs": {"url": "http://docs-mcp.tools.svc:8000/mcp"}}}, "mcp.upstreams.docs"),
    ("mcp", {"upstreams": {"docs": {"url": "http://127.0.0.1@docs-mcp.tools.svc/mcp",
                                    "credential": {"kind": "secret_file", "file": "/nonexistent"}}}},
     "mcp.upstreams.docs"),
    ("invoke", {"tools": {"lookup": {"url": "HTTP://10.0.0.5:8080/items/{item}"}}}, "invoke.tools.lookup"),
])
async def test_a_tool_in_clear_off_loopback_stops_the_start_naming_its_key(tmp_path, section, values, key):
    code, err, left = await serve(tmp_path, settings(tmp_path, **{section: values}))
    assert code == 2, err
    assert f"agent-sidecar: {key}.url: its calls' arguments and answers" in err, err
    assert f"set {key}.allow_plaintext: true where the network encrypts the hop itself" in err, err
    assert "OPA" not in err and "Traceback" not in err, err
    assert not (tmp_path / "evidence").exists() and left == []


@pytest.mark.parametrize("telemetry, env, key", [
    ({"endpoint": "http://otel-collector.observability.svc:4317"}, {}, "telemetry.endpoint"),
    ({"endpoint": ""}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability.svc:4317"},
     "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ({"endpoint": "", "protocol": "http/protobuf"},
     {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "HTTP://10.0.0.7:4318/v1/traces"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
])
async def test_spans_in_clear_off_loopback_stop_the_start_naming_where_the_endpoint_came_from(tmp_path, telemetry, env,
                                                                                             key):
    code, err, left = await serve(tmp_path, settings(tmp_path, telemetry=telemetry), env)
    assert code == 2, err
    assert f"agent-sidecar: {key}: the evidence spans" in err and "telemetry.allow_plaintext: true" in err, err
    assert "Traceback" not in err, err
    assert left == []  # whatever the start had begun (a variable is only read where the exporter is built) is undone


@pytest.mark.parametrize("flags", [[], ["--sidecar", "10.0.0.5:50051"]], ids=["console.sidecar", "--sidecar"])
async def test_a_console_reaching_its_sidecar_in_clear_off_loopback_does_not_start(tmp_path, flags):
    path = tmp_path / "console.yaml"
    path.write_text(yaml.safe_dump({
        "identity": {"sources": ["dev"]},
        "console": {"listen": "127.0.0.1:0", "dev_approver": "email:dev@example.org",
                    "sidecar": "agent-sidecars.agents.svc:50051"},
    }))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "console", "--config", str(path), *flags, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2, err
    target = flags[1] if flags else "agent-sidecars.agents.svc:50051"
    assert err.decode().startswith(f"agent-sidecar: console.sidecar: the console's JWT-SVID, the approver it names "
                                   f"and every approval would go in clear over plaintext gRPC to {target!r}"), err
    assert out == b""


async def test_a_postgres_off_the_pod_without_verified_tls_stops_the_start(tmp_path):
    """The PG* variables (dsn "") are read as libpq reads them, at load: nothing is started."""
    code, err, left = await serve(tmp_path, settings(tmp_path, escalation={"store": "postgres"}),
                                  {"PGHOST": "agent-postgres.agents.svc", "PGSSLMODE": "prefer"})
    assert code == 2, err
    assert err.startswith("agent-sidecar: escalation.dsn (the PG* variables): escalations (argument previews, "
                          "approvers, decisions) would go to PostgreSQL at agent-postgres.agents.svc with "
                          "sslmode=prefer ("), err
    assert "OPA" not in err and "Traceback" not in err, err
    assert not (tmp_path / "evidence").exists() and left == []


LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, b"%d\\n" % os.getpid(), 0)
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_during_the_evidence_lock_wait_stops_the_start_at_once(tmp_path, signum):
    """A rolling restart: the old pod still holds evidence.dir's lock and the new sidecar waits up to
    evidence.lock_wait_seconds. SIGTERM (the pod deleted) or SIGINT (Ctrl-C) ends the wait at once: exit
    128 + the signal, no `startup` record, no OPA, its listeners let go; the holder keeps its lock."""
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", LOCK_HOLDER, str(evidence / "LOCK"),
                                                  stdout=asyncio.subprocess.PIPE)
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"held\n"
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(settings(tmp_path, telemetry={"exporter": "none"},
                                                evidence={"lock_wait_seconds": 600})))
        with tempfile.TemporaryDirectory(dir="/tmp") as tmpdir:
            sidecar = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar", "serve", "--config", str(path), cwd=REPO,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, "TMPDIR": tmpdir},
            )
            err = b""
            while b"waiting up to 600 s" not in err:
                line = await asyncio.wait_for(sidecar.stderr.readline(), 60)
                assert line, err.decode()  # it exited instead of waiting
                err += line
            assert f"locked by pid {holder.pid}".encode() in err
            assert (tmp_path / "sidecar.sock").is_socket()  # its listeners are bound before the wait
            sent = time.monotonic()
            sidecar.send_signal(signum)
            rest = await asyncio.wait_for(sidecar.stderr.read(), 30)
            code = await sidecar.wait()
            took = time.monotonic() - sent
            err = (err + rest).decode()
            assert took < 3, (took, err)
            assert code == 128 + signum, err
            name = signal.Signals(signum).name
            assert f"agent-sidecar: {name} while starting: stopped; nothing was left running" in err, err
            assert "Traceback" not in err and "serving revision" not in err, err
            assert os.listdir(tmpdir) == []  # no OPA directory
        assert logged(evidence) == [] and sorted(os.listdir(evidence)) == ["LOCK"]  # no startup record, no store
        assert not (tmp_path / "sidecar.sock").exists()
        assert holder.returncode is None  # the holder still holds it
    finally:
        holder.kill()
        await holder.wait()
