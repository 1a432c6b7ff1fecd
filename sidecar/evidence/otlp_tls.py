"""OTLP over TLS with its CA and client certificate in files that rotate (an X.509-SVID spiffe-helper rewrites).

The SDK's OTLP exporters take OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE (the CA that
verifies the collector) and CLIENT_CERTIFICATE / CLIENT_KEY (mutual TLS) as file
names. The gRPC exporter reads them once, when it is built, and keeps them for
the life of its channel, reconnections included; and a file it cannot read
becomes, with only a log line, the system's roots and no client certificate. An
X.509-SVID lives about an hour and SPIRE's CA is replaced within days, so a
sidecar that read them once would be refused by the collector (expired client
certificate) or refuse it (a server certificate from a CA it never read) on a
later connection, for as long as it runs.

`RereadingExporter` reads the files itself and builds the exporter from what it
read; before each export it looks at the files again (stat: size, mtime, inode)
and, when one changed, builds a new exporter from the new contents. A file that
cannot be read fails the export (the shipper retries with backoff, the spans
stay in the log) instead of falling back to other roots. Over HTTP the exporter
gets a `PinnedCaSession`, so that REQUESTS_CA_BUNDLE cannot put the public
roots in the CA file's place.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import requests
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sidecar.config import ConfigError

log = logging.getLogger(__name__)

# The SDK's order: the traces-specific CA, with its own client pair, else the generic ones.
_PREFIXES = ("OTEL_EXPORTER_OTLP_TRACES_", "OTEL_EXPORTER_OTLP_")


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one OTLP/TLS setting: the CA bundle, and the client certificate and key or neither."""

    ca: str
    client_certificate: str = ""
    client_key: str = ""

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.ca, self.client_certificate, self.client_key) if p)

    def read(self) -> tuple[bytes, bytes | None, bytes | None]:
        """(CA, client certificate chain or None, client key or None); OSError when one cannot be read
        or is empty (being rewritten: gRPC would take empty roots for its default ones)."""
        def content(path: str) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as f:
                data = f.read()
            if not data.strip():
                raise OSError(f"{path} is empty")
            return data

        return content(self.ca) or b"", content(self.client_certificate), content(self.client_key)


def tls_files(environ: Mapping[str, str]) -> TlsFiles | None:
    """The TLS files the OTEL_* variables name, as the SDK picks them; None without a CA file.

    ConfigError when half of a client pair is set, or a client pair without a CA: the gRPC
    exporter would send no client certificate and say nothing, and the collector may then
    take the connection only because it does not ask for one."""
    for prefix in _PREFIXES:
        ca = environ.get(f"{prefix}CERTIFICATE", "")
        certificate = environ.get(f"{prefix}CLIENT_CERTIFICATE", "")
        key = environ.get(f"{prefix}CLIENT_KEY", "")
        if bool(certificate) != bool(key):
            raise ConfigError(f"{prefix}CLIENT_CERTIFICATE and {prefix}CLIENT_KEY: set both (mutual TLS) or neither")
        if certificate and not ca:
            raise ConfigError(f"{prefix}CLIENT_CERTIFICATE needs {prefix}CERTIFICATE (the CA that verifies the collector)")
        if ca:
            return TlsFiles(ca, certificate, key)
    return None


class PinnedCaSession(requests.Session):
    """A requests Session whose `verify` (the CA file the HTTP exporter sets) is the one that verifies.

    Plain requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, often set machine-wide to the public
    roots, replace a session's `verify` on every request (psf/requests#3829): the collector would be
    checked against those roots and never against the configured CA. A CA given for one request still
    wins, and proxies and the rest of the environment apply as usual."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        return super().merge_environment_settings(url, proxies, stream, self.verify if verify is None else verify, cert)


def _stamp(paths: Sequence[str]) -> tuple:
    stamps = []
    for path in paths:
        st = os.stat(path)
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


class RereadingExporter(SpanExporter):
    """A SpanExporter that rebuilds its inner exporter whenever the TLS files change (module docstring).

    `build(ca, client_certificate, client_key)` makes the inner exporter from the files'
    contents. Exports run outside the lock, so `shutdown` (from the shipper's closing
    thread) interrupts an export's retry sleeps as it does for the inner exporter.
    """

    def __init__(self, files: TlsFiles, build: Callable[[bytes, bytes | None, bytes | None], SpanExporter]):
        self._files = files
        self._build = build
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._inner: SpanExporter | None = None
        self._closed = False
        self._unreadable = ""

    def _current(self) -> SpanExporter | None:
        with self._lock:
            if self._closed:
                return None
            try:
                stamp = _stamp(self._files.paths)  # before reading: a write after it is seen next time
                if stamp != self._stamp:
                    ca, certificate, key = self._files.read()
                    old, self._inner, self._stamp = self._inner, self._build(ca, certificate, key), stamp
                    if old is not None:
                        old.shutdown()
            except OSError as exc:
                if self._unreadable != str(exc):
                    log.warning("OTLP TLS files unreadable, spans wait in the log: %s", exc)
                    self._unreadable = str(exc)
                return None
            self._unreadable = ""
            return self._inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        inner = self._current()
        if inner is None:
            return SpanExportResult.FAILURE
        return inner.export(spans)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        inner = self._inner
        return True if inner is None else inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            inner, self._inner = self._inner, None
        if inner is not None:
            inner.shutdown()
