"""OTLP over mutual TLS with the CA and client certificate in files that change (sidecar/evidence/otlp_tls.py).

The collector is the real Jaeger v2 (.tools/bin/jaeger) serving both OTLP
receivers over TLS with a certificate for localhost from a test CA, and asking
for client certificates from the same CA. The exporter is what
exporter_from_env builds from the OTEL_EXPORTER_OTLP_* variables, for gRPC and
for HTTP. What could fail: the files are read again when they change (a
rotated SVID, a new bundle), an unreadable one fails the export instead of
falling back to the system's roots, and half a client pair is refused at start.
The deploy/k8s example's hop is in tests/test_deploy_tls.py.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest
import requests

from sidecar.config import ConfigError
from sidecar.evidence.otlp_tls import RereadingExporter, TlsFiles, tls_files
from sidecar.evidence.spans import ResourceCache, exporter_from_env, spans_for_record
from tests.doubles.pki import TestCa
from tests.infra.jaeger import Jaeger

PROTOCOLS = ["grpc", "http/protobuf"]


def record() -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"kind": "decision", "seq": 1, "hash": "sha256:" + "0" * 64, "sidecar": "otlp-tls", "time": now,
            "logged_at": now, "trace_id": secrets.token_hex(16), "span_id": secrets.token_hex(8),
            "tool": "read_file", "tool_known": True, "call_id": "c-1", "outcome": "allow",
            "subject": {"spiffe_id": "spiffe://example.org/agent", "source": "workload_api"}}


def export(exporter, one: dict) -> str:
    return exporter.export(spans_for_record(one, ResourceCache("otlp-tls"))).name


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The collector's CA and certificate (localhost), and the client's files, as spiffe-helper would lay them out."""
    root = tmp_path_factory.mktemp("otlp-tls")
    ca = TestCa("example.org")
    server = ca.issue("/collector", dns_names=("localhost",))
    (root / "server.pem").write_bytes(server.chain_pem())
    (root / "server.key").write_bytes(server.key_pem())
    (root / "ca.pem").write_bytes(ca.bundle_pem())
    return root, ca


@pytest.fixture(scope="module")
def collector(pki):
    root, _ = pki
    tls = {"cert_file": str(root / "server.pem"), "key_file": str(root / "server.key"),
           "client_ca_file": str(root / "ca.pem"), "min_version": "1.3"}
    with Jaeger(root / "jaeger", otlp_tls=tls) as jaeger:
        yield jaeger


def client_files(directory: Path, ca: TestCa) -> dict[str, Path]:
    directory.mkdir()
    client = ca.issue("/sidecar")
    files = {"bundle": directory / "bundle.pem", "svid": directory / "svid.pem", "key": directory / "svid_key.pem"}
    files["bundle"].write_bytes(ca.bundle_pem())
    files["svid"].write_bytes(client.chain_pem())
    files["key"].write_bytes(client.key_pem())
    return files


def environment(files: dict[str, Path]) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(files["bundle"]),
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": str(files["svid"]),
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": str(files["key"])}


def endpoint(jaeger: Jaeger, protocol: str) -> str:
    return f"https://localhost:{jaeger.ports['otlp_grpc' if protocol == 'grpc' else 'otlp_http']}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_exporter_reads_its_tls_files_again_when_they_change(pki, collector, tmp_path, monkeypatch, protocol):
    _, ca = pki
    # Set machine-wide in many images; plain requests would verify the collector against it instead (PinnedCaSession).
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    monkeypatch.setenv("CURL_CA_BUNDLE", requests.certs.where())
    files = client_files(tmp_path / "svid", ca)
    exporter = exporter_from_env(protocol=protocol, endpoint=endpoint(collector, protocol), timeout_seconds=3,
                                 environ=environment(files))
    assert isinstance(exporter, RereadingExporter)
    try:
        first = record()
        assert export(exporter, first) == "SUCCESS"
        assert collector.trace(first["trace_id"])
        right = {kind: path.read_bytes() for kind, path in files.items()}
        other = TestCa("example.org")  # what did not issue the collector's certificate, or was not trusted by it
        foreign = other.issue("/sidecar")
        for kind, content in (("bundle", other.bundle_pem()), ("svid", foreign.chain_pem()), ("key", foreign.key_pem())):
            files[kind].write_bytes(content)
            if kind == "svid":
                continue  # a certificate and its key are rewritten together: fail with the pair
            assert export(exporter, record()) == "FAILURE", f"still the old {kind}"
            for name, path in files.items():
                path.write_bytes(right[name])
            again = record()
            assert export(exporter, again) == "SUCCESS", f"the {kind} restored, not read again"
            assert collector.trace(again["trace_id"])
        # A rotated client certificate from the right CA (the next SVID) works from the next export on.
        renewed = ca.issue("/sidecar")
        files["svid"].write_bytes(renewed.chain_pem())
        files["key"].write_bytes(renewed.key_pem())
        assert export(exporter, record()) == "SUCCESS"
        # An unreadable or empty file (caught mid-rewrite) fails the export (the spans wait in the log),
        # never the system's roots instead.
        files["bundle"].unlink()
        assert export(exporter, record()) == "FAILURE"
        files["bundle"].write_bytes(b"")
        assert export(exporter, record()) == "FAILURE"
        files["bundle"].write_bytes(right["bundle"])
        assert export(exporter, record()) == "SUCCESS"
    finally:
        exporter.shutdown()
    assert export(exporter, record()) == "FAILURE"  # shut down: no new exporter is built


def test_the_collector_refuses_an_exporter_without_a_client_certificate(pki, collector, tmp_path):
    """The refusal the mutual TLS above depends on (the collector asks for a client certificate)."""
    _, ca = pki
    files = client_files(tmp_path / "svid", ca)
    only_ca = {"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(files["bundle"])}
    for protocol in PROTOCOLS:
        exporter = exporter_from_env(protocol=protocol, endpoint=endpoint(collector, protocol), timeout_seconds=3,
                                     environ=only_ca)
        try:
            assert export(exporter, record()) == "FAILURE", protocol
        finally:
            exporter.shutdown()


def test_an_empty_tls_file_is_unreadable(tmp_path):
    """Caught between spiffe-helper's truncate and write: gRPC would take empty roots for its default ones."""
    (tmp_path / "ca.pem").write_bytes(b"\n")
    with pytest.raises(OSError, match="ca.pem is empty"):
        TlsFiles(str(tmp_path / "ca.pem")).read()


def test_tls_files_are_picked_as_the_sdk_picks_them_and_half_a_client_pair_is_refused():
    assert tls_files({}) is None
    assert tls_files({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca"}) == TlsFiles("/ca")
    both = {"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/t-ca", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": "/t-c",
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": "/t-k", "OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca"}
    assert tls_files(both) == TlsFiles("/t-ca", "/t-c", "/t-k")  # the traces-specific ones win, as a set
    for prefix in ("OTEL_EXPORTER_OTLP_TRACES_", "OTEL_EXPORTER_OTLP_"):
        with pytest.raises(ConfigError, match=f"{prefix}CLIENT_CERTIFICATE and {prefix}CLIENT_KEY: set both"):
            tls_files({f"{prefix}CERTIFICATE": "/ca", f"{prefix}CLIENT_KEY": "/k"})
        with pytest.raises(ConfigError, match=f"{prefix}CLIENT_CERTIFICATE needs {prefix}CERTIFICATE"):
            tls_files({f"{prefix}CLIENT_CERTIFICATE": "/c", f"{prefix}CLIENT_KEY": "/k"})
    # Refused where the exporter is built, i.e. at the sidecar's start.
    with pytest.raises(ConfigError, match="CLIENT_KEY: set both"):
        exporter_from_env(endpoint="https://collector.example:4317",
                          environ={"OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "/c"})
    # Plaintext (an http:// endpoint, allowed on loopback) has no TLS files to read.
    plain = exporter_from_env(endpoint="http://127.0.0.1:4317", environ={"OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca"})
    assert not isinstance(plain, RereadingExporter)
    plain.shutdown()
