"""deploy/k8s's two TLS hops, run for real with the manifests' own settings.

No cluster here. What the pods do is done with real processes on loopback,
from the files the ConfigMaps carry:

- SPIRE (tests/infra/spire.py, trust domain example.org) issues each pod's
  X.509-SVID: the database's and the collector's with the DNS names their
  ClusterSPIFFEIDs give, the sidecar's for the agent pod's SPIFFE ID. They are
  written to files under the names each pod's spiffe-helper config gives
  (`write_svid_files`: spiffe-helper's binary is not on this machine).
- PostgreSQL (tests/doubles/postgres.py, Debian's server) runs with the
  postgres container's `-c` settings (ssl on, the SVID files, the pg_hba.conf
  of the ConfigMap agent-postgres-hba) and the password set at initdb, as the
  image does. The sidecar's own stores connect with the PG* variables of the
  StatefulSet (PGSSLMODE=verify-full, its SVID as client certificate); PGHOST
  stays the manifest's name and PGHOSTADDR=127.0.0.1 stands in for the
  cluster's DNS (libpq checks the certificate against PGHOST).
- ssl-reload's script, run as the manifest has it, reloads PostgreSQL after
  the files are rewritten.
- Jaeger v2 (.tools/bin/jaeger, built on the collector) serves OTLP with the
  collector.yaml receiver's `tls` block. The sidecar's exporter
  (exporter_from_env, as server.build_recorder calls it, with the ConfigMap's
  telemetry section and the StatefulSet's OTEL_* variables) runs in a child
  process in its own mount namespace (`unshare -m`), whose /etc/hosts maps
  the collector's Service name to 127.0.0.1: gRPC resolves and checks the
  manifest's host name itself.

Paths and ports differ from the pods'; nothing else in the configs changes.
test_deploy_loop.py runs the whole escalation loop over the same PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
import yaml
from cryptography import x509

import tests.test_deploy_k8s as k8s
from sidecar.config import load_config
from sidecar.server import build_usage
from sidecar.usage import Usage, UsageUnavailable
from tests.conftest import REPO
from tests.doubles.pki import TestCa
from tests.doubles.postgres import PostgresServer
from tests.infra.jaeger import Jaeger
from tests.infra.process import free_port
from tests.infra.spire import SpireServer, SpireUnavailable, Workload
from tests.test_deploy_k8s import built  # noqa: F401  (module fixture: deploy/k8s with a signed bundle)

TD = "example.org"
PASSWORD = "s3cret-" + secrets.token_hex(8)  # the Secret agent-postgres, here


@pytest.fixture(scope="module")
def spire():
    try:
        server = SpireServer(TD).start()
    except SpireUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.close()


@pytest.fixture(scope="module")
def node(spire):
    return spire.agent("node-tls")


def registered(node, workload: Workload, registration: str, *, dns: list[str] | None = None) -> Workload:
    """`workload` registered as the ClusterSPIFFEID `registration` renders it (its DNS names unless `dns`)."""
    spiffe_id, rendered_dns, _ = k8s.rendered_registration(registration)
    node.register(spiffe_id.removeprefix(f"spiffe://{TD}"), *workload.selectors, dns=rendered_dns if dns is None else dns)
    return workload


def registered_agent(node, name: str) -> Workload:
    """A workload with the agent pods' SPIFFE ID (ClusterSPIFFEID ai-agents: no DNS names)."""
    workload = node.workload(name)
    node.register(k8s.RESEARCH_AGENT.removeprefix(f"spiffe://{TD}"), *workload.selectors)
    return workload


def write_svid_files(workload: Workload, config_map: tuple[str, str], directory: Path, owner: str | None = None) -> dict[str, Path]:
    """What spiffe-helper does in the pod: the workload's SVID chain, key and trust bundle from SPIRE, under the
    file names of the pod's helper.conf, the key 0600 and owned by `owner` (the pod's user)."""
    helper = k8s.spiffe_helper_config(k8s.config_map_files(*config_map)["helper.conf"].decode())
    svid = workload.wait_for_identity()
    directory.mkdir(parents=True, exist_ok=True)
    files = {"svid": directory / helper["svid_file_name"], "key": directory / helper["svid_key_file_name"],
             "bundle": directory / helper["svid_bundle_file_name"]}
    files["svid"].write_bytes(svid.chain_pem)
    files["bundle"].write_bytes(svid.bundle_pem)
    files["key"].write_bytes(svid.key_pem)
    files["key"].chmod(0o600)
    for path in (directory, *files.values()):
        if owner:
            shutil.chown(path, owner, owner)
    return files


def leaf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]


# --- PostgreSQL ------------------------------------------------------------------------------------------------


def postgres_settings(directory: Path) -> dict[str, str]:
    """The postgres container's `-c` settings, its volumes' paths under `directory` (the ConfigMap's pg_hba.conf there)."""
    spec = k8s.pod_spec("agent-postgres")
    postgres = k8s.container(spec, "postgres")
    settings = dict(value.split("=", 1) for value in postgres["args"][1::2])
    svid_dir = k8s.mount_path(postgres, "postgres-svid")
    hba = Path(settings["hba_file"])
    (directory / hba.name).write_bytes(k8s.config_map_files("agents", "agent-postgres-hba")[hba.name])
    settings["hba_file"] = str(directory / hba.name)
    return {name: value.replace(svid_dir, str(directory)) for name, value in settings.items()}


@contextmanager
def manifest_postgres(server_svid: Workload) -> Iterator[tuple[PostgresServer, dict[str, Path]]]:
    """agent-postgres as its manifest runs it: TLS with `server_svid`'s files, pg_hba.conf from the ConfigMap."""
    directory = Path(tempfile.mkdtemp(prefix="pgsvid", dir="/tmp"))
    directory.chmod(0o755)
    owner = "postgres" if os.geteuid() == 0 else None  # the server runs as postgres under root (tests/doubles/postgres.py)
    files = write_svid_files(server_svid, ("agents", "agent-postgres-spiffe-helper"), directory, owner)
    server = PostgresServer(tcp_port=free_port(), settings=postgres_settings(directory), password=PASSWORD)
    try:
        server.start()
        database = {e["name"]: e for e in k8s.container(k8s.pod_spec("agent-postgres"), "postgres")["env"]}
        with psycopg.connect(server.dsn(), autocommit=True) as conn:  # the image's POSTGRES_DB
            conn.execute(f'CREATE DATABASE "{database["POSTGRES_DB"]["value"]}"')
        yield server, files
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def sidecar_pg_environment(server: PostgresServer, client_files: dict[str, Path]) -> dict[str, str]:
    """The agent-sidecar container's PG* variables, its SVID files and the database's port here; PGHOST kept."""
    sidecar = k8s.container(k8s.pod_spec("research-agent"), "agent-sidecar")
    svid_dir = k8s.mount_path(sidecar, "sidecar-svid")
    directory = str(client_files["svid"].parent)
    variables = {e["name"]: e["value"].replace(svid_dir, directory)
                 for e in sidecar["env"] if e["name"].startswith("PG") and "value" in e}
    assert {"PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"} <= set(variables)
    return {**variables, "PGPORT": str(server.port), "PGHOSTADDR": "127.0.0.1", "PGPASSWORD": PASSWORD}


def apply_environment(monkeypatch, variables: dict[str, str]) -> None:
    for name in [n for n in os.environ if n.startswith("PG")]:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


async def count_until(counter, done: Callable[[object], bool], timeout: float = 30):
    """Count calls with the sidecar's usage store until `done(outcome)` (a Usage or the UsageUnavailable raised).

    A first connection (TLS, SCRAM) can take longer than usage.timeout_ms on a busy machine; in the pod the
    startup probe waits for the store (SERVING) before the agent's first call."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            outcome: object = await counter.count(k8s.RESEARCH_AGENT, "search_docs", "")
        except UsageUnavailable as exc:
            outcome = exc
        if done(outcome):
            return outcome
        assert time.monotonic() < deadline, outcome
        await asyncio.sleep(0.2)


def sidecar_config_here(tmp_path: Path):
    """The ConfigMap's sidecar.yaml, loaded (its checks included) with the PG* variables already set."""
    source = tmp_path / "sidecar.yaml"
    source.write_bytes(k8s.config_map_files("agents", "agent-sidecar-config")["sidecar.yaml"])
    return load_config(source, {"evidence.dir": str(tmp_path / "evidence")})


def ssl_connections(server: PostgresServer) -> list[tuple]:
    """(ssl, TLS version, client certificate's issuer DN) of every client backend over TCP."""
    # The unix socket, whatever PG* variables this process has (empty values override them).
    with psycopg.connect(f"{server.dsn('sidecar')} hostaddr='' sslmode=disable sslcert='' sslkey=''") as conn:
        return conn.execute(
            "SELECT s.ssl, s.version, s.client_dn, s.issuer_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.backend_type = 'client backend' AND a.client_addr IS NOT NULL AND a.pid <> pg_backend_pid()"
        ).fetchall()


async def test_the_sidecars_stores_reach_postgres_over_verified_mutual_tls(node, tmp_path, monkeypatch):
    postgres_svid = registered(node, node.workload("agent-postgres"), "agent-postgres")
    client = write_svid_files(registered_agent(node, "agent-helper"), ("agents", "agent-sidecar-spiffe-helper"),
                              tmp_path / "sidecar-svid")
    with manifest_postgres(postgres_svid) as (server, server_files):
        apply_environment(monkeypatch, sidecar_pg_environment(server, client))
        config = sidecar_config_here(tmp_path)  # loads: verify-full passes the sidecar's own check
        assert config.usage.store == config.escalation.store == "postgres"
        async with build_usage(config) as counter:
            usage = await count_until(counter, lambda outcome: isinstance(outcome, Usage))
            assert usage.calls_in_window >= 1
            # The sidecar's connections, as PostgreSQL sees them: TLS 1.3, each with a client certificate
            # (verified against the bundle: clientcert=verify-ca).
            connections = ssl_connections(server)
        assert connections
        for ssl_on, version, _, issuer_dn in connections:
            assert ssl_on and version == "TLSv1.3" and issuer_dn, connections
        # The server presented its SVID for the manifest's host name.
        dns = leaf(server_files["svid"].read_bytes()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        assert os.environ["PGHOST"] in dns


@pytest.mark.parametrize("wrong", ["another host name", "another CA", "no client certificate", "no TLS"])
async def test_the_sidecar_and_postgres_refuse_each_other_when_tls_is_wrong(node, tmp_path, monkeypatch, caplog, wrong):
    """The refusals the positive test depends on: each one is made by the real party that must make it
    (libpq for the server's name and CA, PostgreSQL's pg_hba.conf for the client certificate and plaintext)."""
    name = wrong.replace(" ", "-")
    postgres_svid = node.workload(f"pg-{name}")
    registered(node, postgres_svid, "agent-postgres",
               dns=["agent-postgres.evil.svc.cluster.local"] if wrong == "another host name" else None)
    client = write_svid_files(registered_agent(node, f"helper-{name}"), ("agents", "agent-sidecar-spiffe-helper"),
                              tmp_path / "sidecar-svid")
    with manifest_postgres(postgres_svid) as (server, _):
        variables = sidecar_pg_environment(server, client)
        expected = {
            "another host name": f'server certificate for "agent-postgres.evil.svc.cluster.local" does not match host name "{variables["PGHOST"]}"',
            "another CA": "certificate verify failed",
            "no client certificate": "connection requires a valid client certificate",
            "no TLS": "no encryption",
        }[wrong]
        if wrong == "another CA":  # the sidecar trusts a CA that did not issue the database's SVID
            Path(variables["PGSSLROOTCERT"]).write_bytes(TestCa(TD).bundle_pem())
        elif wrong == "no client certificate":
            empty = tmp_path / "none"
            variables.update(PGSSLCERT=str(empty / "svid.pem"), PGSSLKEY=str(empty / "svid_key.pem"))
        apply_environment(monkeypatch, variables)
        if wrong == "no TLS":
            # The sidecar refuses this at load (test_deploy_k8s.py); the server refuses it too, for any client.
            with pytest.raises(psycopg.OperationalError, match=expected):
                psycopg.connect(sslmode="disable", connect_timeout=5).close()
            return
        config = sidecar_config_here(tmp_path)

        def refused(outcome: object) -> bool:
            assert isinstance(outcome, UsageUnavailable), outcome  # never a count
            return expected in caplog.text  # why, as the store's pool logs each failed attempt

        async with build_usage(config) as counter:
            await count_until(counter, refused)


def server_certificate(port: int) -> x509.Certificate:
    """The certificate PostgreSQL presents now: its SSLRequest, then a TLS handshake that verifies nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(struct.pack("!ii", 8, 80877103))
        assert raw.recv(1) == b"S"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(raw) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_ssl_reload_makes_postgres_serve_the_rewritten_svid(node):
    """The ssl-reload container's script, as the manifest has it: after spiffe-helper rewrites the files,
    PostgreSQL (which reads them only at start and on reload) serves the new SVID on new connections."""
    first = registered(node, node.workload("pg-first"), "agent-postgres")
    second = registered(node, node.workload("pg-second"), "agent-postgres")  # the same identity, another SVID
    spec = k8s.pod_spec("agent-postgres")
    reload_ = k8s.container(spec, "ssl-reload")
    with manifest_postgres(first) as (server, files):
        served = server_certificate(server.port)
        assert served == leaf(files["svid"].read_bytes())
        script = reload_["args"][0].replace(k8s.mount_path(reload_, "postgres-svid"), str(files["svid"].parent))
        environment = {**os.environ, "PGDATA": str(server.data), "PATH": f"{server.bindir}:{os.environ['PATH']}"}
        user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        reloader = subprocess.Popen([*user, *reload_["command"], script], env=environment, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log = server.dir / "server.log"
        try:
            # Its first round reloads what is there (the same files); the rewrite below is then a change it must see.
            deadline = time.monotonic() + 30
            while "received SIGHUP" not in log.read_text():
                assert time.monotonic() < deadline and reloader.poll() is None, reloader.stderr.read()
                time.sleep(0.2)
            write_svid_files(second, ("agents", "agent-postgres-spiffe-helper"), files["svid"].parent,
                             "postgres" if os.geteuid() == 0 else None)
            renewed = leaf(files["svid"].read_bytes())
            assert renewed.serial_number != served.serial_number
            deadline = time.monotonic() + 30  # the script looks every 10 s
            while server_certificate(server.port) != renewed:
                assert time.monotonic() < deadline, "PostgreSQL still serves the old SVID"
                assert reloader.poll() is None, reloader.stderr.read()
                time.sleep(0.5)
        finally:
            os.killpg(reloader.pid, signal.SIGTERM)
            reloader.wait(timeout=10)


# --- OTLP to the collector ----------------------------------------------------------------------------------------

COLLECTOR_CONFIG = ("observability", "otel-collector-config")


def collector_tls(files: dict[str, Path]) -> dict:
    """collector.yaml's gRPC receiver `tls` block, its paths those of `files`."""
    collector = yaml.safe_load(k8s.config_map_files(*COLLECTOR_CONFIG)["collector.yaml"])
    tls = collector["receivers"]["otlp"]["protocols"]["grpc"]["tls"]
    served = k8s.svid_files("otel-collector")
    by_path = {served[kind]: str(files[kind]) for kind in ("svid", "key", "bundle")}
    return {key: by_path.get(value, value) for key, value in tls.items()}


# The sidecar's exporter as server.build_recorder builds it, in a child process: one decision record per line
# on stdin, the export's result on stdout.
PROBE = """
import json, sys
from sidecar.config import load_config
from sidecar.evidence.spans import ResourceCache, exporter_from_env, spans_for_record
telemetry = load_config(sys.argv[1], {"telemetry.endpoint": sys.argv[2]}).telemetry
exporter = exporter_from_env(exporter=telemetry.exporter, protocol=telemetry.protocol, endpoint=telemetry.endpoint,
                             timeout_seconds=5, allow_plaintext=telemetry.allow_plaintext)
print(type(exporter).__name__, flush=True)
resources = ResourceCache(telemetry.service_name)
for line in sys.stdin:
    print(exporter.export(spans_for_record(json.loads(line), resources)).name, flush=True)
exporter.shutdown()
"""


class ExporterProbe:
    """The child process running PROBE in its own mount namespace, the collector's host name on 127.0.0.1."""

    def __init__(self, tmp_path: Path, port: int, variables: dict[str, str]):
        config = k8s.sidecar_config()
        endpoint = urlsplit(config.telemetry.endpoint)
        self.endpoint = f"{endpoint.scheme}://{endpoint.hostname}:{port}"  # the manifest's host, Jaeger's port
        hosts = tmp_path / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1 {endpoint.hostname}\n")
        source = tmp_path / "probe-sidecar.yaml"
        source.write_bytes(k8s.config_map_files("agents", "agent-sidecar-config")["sidecar.yaml"])
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PG"))}
        environment.update(variables, PYTHONPATH=str(REPO))
        self.process = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
             sys.executable, "-c", PROBE, str(source), self.endpoint],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=environment)
        self.kind = self._line()

    def _line(self) -> str:
        line = self.process.stdout.readline().strip()
        assert line, f"probe exited: {self.process.stderr.read()[-3000:]}"
        return line

    def export(self, record: dict) -> str:
        self.process.stdin.write(json.dumps(record) + "\n")
        self.process.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def decision_record() -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"kind": "decision", "seq": 1, "hash": "sha256:" + "0" * 64, "sidecar": "tls-test", "time": now,
            "logged_at": now, "trace_id": secrets.token_hex(16), "span_id": secrets.token_hex(8),
            "tool": "search_docs", "tool_known": True, "call_id": "c-1", "outcome": "allow",
            "subject": {"spiffe_id": k8s.RESEARCH_AGENT, "source": "workload_api"}}


def sidecar_otlp_environment(client_files: dict[str, Path]) -> dict[str, str]:
    """The agent-sidecar container's OTEL_* variables, its SVID files here."""
    sidecar = k8s.container(k8s.pod_spec("research-agent"), "agent-sidecar")
    svid_dir = k8s.mount_path(sidecar, "sidecar-svid")
    variables = {e["name"]: e["value"].replace(svid_dir, str(client_files["svid"].parent))
                 for e in sidecar["env"] if e["name"].startswith("OTEL_") and "value" in e}
    assert set(variables) == {"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                              "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY"}
    return variables


@contextmanager
def collector(tmp_path: Path, svid: Workload) -> Iterator[Jaeger]:
    files = write_svid_files(svid, ("observability", "otel-collector-spiffe-helper"), tmp_path / "collector-svid")
    with Jaeger(tmp_path / "jaeger", otlp_tls=collector_tls(files)) as jaeger:
        yield jaeger


def test_the_sidecar_exports_spans_to_the_collector_over_mutual_tls(node, tmp_path):
    client = write_svid_files(registered_agent(node, "otlp-helper"), ("agents", "agent-sidecar-spiffe-helper"),
                              tmp_path / "sidecar-svid")
    variables = sidecar_otlp_environment(client)
    with collector(tmp_path, registered(node, node.workload("otel-collector"), "otel-collector")) as jaeger:
        probe = ExporterProbe(tmp_path, jaeger.ports["otlp_grpc"], variables)
        try:
            assert probe.kind == "RereadingExporter"
            record = decision_record()
            assert probe.export(record) == "SUCCESS"
            assert "execute_tool search_docs" in [span.name for span in jaeger.trace(record["trace_id"])]
            # The CA file is read again when it changes: a CA that did not issue the collector's SVID fails
            # the export, the right one (rewritten by spiffe-helper) makes the same exporter work again.
            bundle = Path(variables["OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"])
            right = bundle.read_bytes()
            bundle.write_bytes(TestCa(TD).bundle_pem())
            assert probe.export(decision_record()) == "FAILURE"
            bundle.unlink()  # unreadable: failed, never the system's roots instead
            assert probe.export(decision_record()) == "FAILURE"
            bundle.write_bytes(right)
            again = decision_record()
            assert probe.export(again) == "SUCCESS"
            assert jaeger.trace(again["trace_id"])
        finally:
            probe.close()


@pytest.mark.parametrize("wrong", ["another host name", "no client certificate"])
def test_the_sidecar_and_the_collector_refuse_each_other_when_tls_is_wrong(node, tmp_path, wrong):
    client = write_svid_files(registered_agent(node, f"otlp-{wrong.replace(' ', '-')}"),
                              ("agents", "agent-sidecar-spiffe-helper"), tmp_path / "sidecar-svid")
    variables = sidecar_otlp_environment(client)
    svid = node.workload(f"collector-{wrong.replace(' ', '-')}")
    registered(node, svid, "otel-collector",
               dns=["otel-collector.evil.svc.cluster.local"] if wrong == "another host name" else None)
    if wrong == "no client certificate":
        del variables["OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE"], variables["OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY"]
    with collector(tmp_path, svid) as jaeger:
        probe = ExporterProbe(tmp_path, jaeger.ports["otlp_grpc"], variables)
        try:
            record = decision_record()
            assert probe.export(record) == "FAILURE"
            assert jaeger.trace(record["trace_id"]) == []
        finally:
            probe.close()
    # Why, as gRPC said it: the exporter checked the collector's name; the collector asked for a client certificate.
    assert {"another host name": "Hostname Verification Check failed",
            "no client certificate": "CERTIFICATE_REQUIRED"}[wrong] in probe.process.stderr.read()
