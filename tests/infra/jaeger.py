"""TEST INFRASTRUCTURE: the real Jaeger v2 (`.tools/bin/jaeger`), run in a temp dir on free ports.

Not a double: the `jaeger` binary built from github.com/jaegertracing/jaeger
(tools/pins.env; `make install` builds it into .tools/bin) with a minimal
collector-style config: the OTLP receiver (gRPC and HTTP), the
`jaeger_storage` extension (memory, or badger on disk so traces outlive a
restart) and the `jaeger_query` extension (HTTP query API; the UI assets are
not in a module build, Jaeger serves a placeholder page). Every port is a free
loopback port chosen when the object is made (or given), and kept across
stop()/start().

    with Jaeger(tmp_path / "jaeger") as jaeger:      # returns once OTLP and the query API answer
        telemetry_endpoint = jaeger.otlp_grpc_endpoint   # "http://127.0.0.1:PORT"
        spans = jaeger.trace(trace_id)                   # GET /api/traces/{id}: list[Span]
        traces = jaeger.find("agent-sidecar", tags={"gen_ai.tool.name": "read_file"})
        jaeger.stop(); jaeger.start()                    # an outage; same ports
        jaeger.pause(); jaeger.resume()                  # SIGSTOP/SIGCONT: a collector that hangs

`otlp_tls` serves both OTLP receivers over TLS, with the `tls` block a
collector's config would give them (cert_file, key_file, client_ca_file, ...).

`log_spans=True` adds Jaeger's `debug` exporter (verbosity normal) beside the
storage exporter: every span its pipeline receives is logged as one line
`<name> <trace id> <span id> ...`, in `jaeger.log`, kept across restarts.
`received()` counts them per span id: what Jaeger was sent, duplicates included
(storage cannot show duplicates: badger overwrites a span with the same key and
the query service de-duplicates).

The process (tests/infra/process.py) runs in its own session and is stopped (SIGTERM, then SIGKILL
after `stop_timeout` seconds) by stop(), close(), leaving the `with` block,
and at interpreter exit; it dies with the thread that started it (`setpriv
--pdeathsig`), so call start() from the main thread (a blocking call: in an
async test the event loop waits the fraction of a second it takes). A missing
binary raises JaegerMissing naming `make install`; it is never a skip.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.infra.process import NotReady, Process, free_port, wait_ready, wait_until

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / ".tools" / "bin" / "jaeger"
PINS = REPO / "tools" / "pins.env"
PORT_NAMES = ("otlp_grpc", "otlp_http", "query_http", "query_grpc")
# The debug exporter's "normal" line for one span: name, trace id, span id, attributes.
_SPAN_LINE = re.compile(r"^(?P<name>.*?) (?P<trace>[0-9a-f]{32}) (?P<span>[0-9a-f]{16})(?: |$)", re.M)


class JaegerError(RuntimeError):
    """Jaeger did not start, exited, or its query API answered an error."""


class JaegerMissing(JaegerError):
    pass


def pinned_version() -> str:
    """The Jaeger module version tools/pins.env pins (e.g. "v1.76.0")."""
    for line in PINS.read_text().splitlines():
        if line.startswith("JAEGER_VERSION="):
            return line.split("=", 1)[1].strip()
    raise JaegerError(f"{PINS}: no JAEGER_VERSION")


def find_binary() -> Path:
    """`.tools/bin/jaeger`; raises JaegerMissing (with how to build it) when it is not there."""
    if BINARY.is_file() and os.access(BINARY, os.X_OK):
        return BINARY
    raise JaegerMissing(
        f"the Jaeger binary is missing ({BINARY}): `make install` builds it "
        f"(or `tools/build.sh jaeger`: {pinned_version()} from the Go module, about 9 minutes on 2 busy cores)"
    )


async def wait_until_async(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """wait_until in a worker thread, so a sidecar on the test's event loop keeps serving meanwhile."""
    return await asyncio.to_thread(wait_until, condition, timeout, interval)


@pytest.fixture
def clean_otel_env(monkeypatch):
    """No OTEL_* from the environment: OTEL_TRACES_EXPORTER=none or OTEL_SDK_DISABLED would override config."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@dataclass(frozen=True)
class Span:
    """One span as Jaeger's query API (/api/traces) returns it.

    `parent_span_id` is the CHILD_OF reference; `references` lists them all as
    (ref type, trace id, span id). Jaeger's OTLP translation makes links
    FOLLOWS_FROM references, and a parent that is also linked becomes a single
    FOLLOWS_FROM reference (opentelemetry-collector-contrib
    pkg/translator/jaeger/traces_to_jaegerproto.go, makeJaegerProtoReferences).
    `tags` are the span attributes plus what Jaeger derives (span.kind,
    otel.scope.name, error, otel.status_code ...); array attributes come back
    as JSON strings. `logs` are the span events, each a dict of its fields
    (with `event` holding the event name). `process` is the resource's
    attributes with `service.name`.
    """

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_us: int
    duration_us: int
    tags: dict[str, Any]
    logs: tuple[dict[str, Any], ...]
    process: dict[str, Any]
    references: tuple[tuple[str, str, str], ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())

    @property
    def service(self) -> str:
        return self.process.get("service.name", "")


def _kv(items) -> dict[str, Any]:
    return {item["key"]: item.get("value") for item in items or ()}


def _spans(trace: dict) -> list[Span]:
    processes = {
        pid: {"service.name": p.get("serviceName", ""), **_kv(p.get("tags"))}
        for pid, p in (trace.get("processes") or {}).items()
    }
    out = []
    for s in trace.get("spans") or ():
        parent = next(
            (r["spanID"] for r in s.get("references") or () if r.get("refType") == "CHILD_OF"), ""
        )
        out.append(
            Span(
                trace_id=s["traceID"].rjust(32, "0"),
                span_id=s["spanID"].rjust(16, "0"),
                parent_span_id=parent.rjust(16, "0") if parent else "",
                name=s.get("operationName", ""),
                start_us=int(s.get("startTime") or 0),
                duration_us=int(s.get("duration") or 0),
                tags=_kv(s.get("tags")),
                logs=tuple(_kv(log.get("fields")) for log in s.get("logs") or ()),
                process=processes.get(s.get("processID"), {}),
                references=tuple(
                    (r.get("refType", ""), r["traceID"].rjust(32, "0"), r["spanID"].rjust(16, "0"))
                    for r in s.get("references") or ()
                ),
                warnings=tuple(s.get("warnings") or ()),
            )
        )
    return out


class Jaeger:
    """One Jaeger v2 process (see the module docstring). Not thread-safe; one owner."""

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        storage: str = "memory",
        log_spans: bool = False,
        ports: dict[str, int] | None = None,  # fixed ports by PORT_NAMES name; the others are free ones
        start_timeout: float = 90.0,
        stop_timeout: float = 15.0,
        otlp_tls: dict[str, Any] | None = None,  # the OTLP receivers' `tls` block (configtls), as a collector's
    ):
        if storage not in ("memory", "badger"):
            raise ValueError("storage must be 'memory' or 'badger'")
        self.binary = find_binary()
        self._own_dir = directory is None
        self.dir = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="jaeger-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = storage
        self.log_spans = log_spans
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.otlp_tls = otlp_tls
        self.config_path = self.dir / "config.yaml"
        self.log_path = self.dir / "jaeger.log"
        self._fixed_ports = dict(ports or {})
        self.ports = self._choose_ports()  # known before start(): a sidecar may point at a Jaeger not up yet
        self._started_once = False
        self._process = Process([str(self.binary), "--config", str(self.config_path)], self.log_path,
                                cwd=self.dir, env=self._environment())

    # -- addresses --------------------------------------------------------------

    @property
    def otlp_grpc_endpoint(self) -> str:
        """For telemetry.endpoint with protocol grpc."""
        return f"http://127.0.0.1:{self.ports['otlp_grpc']}"

    @property
    def otlp_http_endpoint(self) -> str:
        """For telemetry.endpoint with protocol http/protobuf (the exporter adds /v1/traces)."""
        return f"http://127.0.0.1:{self.ports['otlp_http']}"

    @property
    def query_url(self) -> str:
        """The query service: HTTP API under /api/, UI (placeholder in module builds) at /."""
        return f"http://127.0.0.1:{self.ports['query_http']}"

    def trace_url(self, trace_id: str) -> str:
        return f"{self.query_url}/api/traces/{trace_id}"

    def telemetry_settings(self, service_name: str = "", protocol: str = "grpc") -> dict[str, Any]:
        """Sidecar config overrides (dotted keys) exporting to this Jaeger; short timeouts and backoff for tests."""
        endpoint = self.otlp_grpc_endpoint if protocol == "grpc" else self.otlp_http_endpoint
        return {
            "telemetry.exporter": "otlp",
            "telemetry.protocol": protocol,
            "telemetry.endpoint": endpoint,
            "telemetry.service_name": service_name,
            "telemetry.export_timeout_seconds": 2.0,
            "telemetry.max_backoff_seconds": 0.5,
        }

    # -- lifecycle --------------------------------------------------------------

    def _config(self) -> dict:
        backend: dict[str, Any]
        if self.storage == "badger":
            data = str(self.dir / "badger")
            backend = {"badger": {"directories": {"keys": data, "values": data}, "ephemeral": False,
                                  "consistency": True, "ttl": {"spans": "24h"}}}
        else:
            backend = {"memory": {"max_traces": 100_000}}
        exporters: dict[str, Any] = {"jaeger_storage_exporter": {"trace_storage": "store"}}
        if self.log_spans:
            exporters["debug"] = {"verbosity": "normal"}
        host = "127.0.0.1"
        tls = {"tls": self.otlp_tls} if self.otlp_tls else {}
        return {
            "service": {
                "extensions": ["jaeger_storage", "jaeger_query"],
                # No batch processor: the OTLP answer then means the spans are in storage.
                "pipelines": {"traces": {"receivers": ["otlp"], "exporters": list(exporters)}},
                "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "info"}},
            },
            "extensions": {
                "jaeger_storage": {"backends": {"store": backend}},
                "jaeger_query": {
                    "storage": {"traces": "store"},
                    "enable_tracing": False,  # its own spans would go to the default OTLP endpoint
                    "http": {"endpoint": f"{host}:{self.ports['query_http']}"},
                    "grpc": {"endpoint": f"{host}:{self.ports['query_grpc']}"},
                },
            },
            "receivers": {
                "otlp": {
                    "protocols": {
                        "grpc": {"endpoint": f"{host}:{self.ports['otlp_grpc']}", **tls},
                        "http": {"endpoint": f"{host}:{self.ports['otlp_http']}", **tls},
                    }
                }
            },
            "exporters": exporters,
        }

    def _choose_ports(self) -> dict[str, int]:
        return {name: self._fixed_ports.get(name) or free_port() for name in PORT_NAMES}

    def start(self) -> "Jaeger":
        """Start (or start again, on the same ports); returns once OTLP and the query API answer."""
        if self.running:
            return self
        # Until the first successful start, a port taken meanwhile means: choose others (a
        # sidecar already pointed at the old ports would miss it; such a collision is rare).
        attempts = 1 if self._started_once or self._fixed_ports else 3
        for attempt in range(attempts):
            self.config_path.write_text(yaml.safe_dump(self._config(), sort_keys=False))
            log_size = self._process.log_size()
            self._process.start()
            try:
                wait_ready(self._process, self._ready, self.start_timeout)
            except NotReady as exc:
                output = self._process.log_since(log_size)
                self._process.kill()
                if attempt + 1 < attempts and "address already in use" in output:
                    self.ports = self._choose_ports()
                    continue
                raise JaegerError(f"jaeger {exc} (config {self.config_path}); its log:\n{output[-4000:]}") from None
            self._started_once = True
            return self
        raise AssertionError("unreachable")

    @staticmethod
    def _environment() -> dict[str, str]:
        # OTEL_* meant for the test process must not reconfigure Jaeger's own telemetry.
        return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.alive

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ports["otlp_grpc"]), timeout=1):
                pass
            with urllib.request.urlopen(f"{self.query_url}/api/services", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Graceful stop (SIGTERM: in-flight OTLP requests finish); SIGKILL after stop_timeout."""
        self._process.stop(self.stop_timeout)

    def pause(self) -> None:
        """SIGSTOP: Jaeger keeps its sockets but answers nothing (a hung collector)."""
        self._process.pause()

    def resume(self) -> None:
        self._process.resume()

    def close(self) -> None:
        """Stop, and remove the directory when this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Jaeger":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # -- logs -------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything Jaeger logged, over all its runs in this directory."""
        return self._process.log_since(0)

    def received(self) -> collections.Counter:
        """span id -> how many times Jaeger's pipeline received it (needs log_spans=True), over all runs."""
        if not self.log_spans:
            raise JaegerError("received() needs Jaeger(log_spans=True)")
        return collections.Counter(m["span"] for m in _SPAN_LINE.finditer(self.log_text()))

    # -- the query API ----------------------------------------------------------

    def _get(self, path: str, params: dict[str, Any] | None = None) -> dict | None:
        url = self.query_url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise JaegerError(f"GET {url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None

    def trace(self, trace_id: str) -> list[Span]:
        """The spans of one trace (GET /api/traces/{id}); [] when Jaeger has none."""
        body = self._get(f"/api/traces/{trace_id}")
        if not body:
            return []
        return [span for trace in body.get("data") or () for span in _spans(trace)]

    def find(
        self,
        service: str,
        *,
        tags: dict[str, str] | None = None,
        operation: str = "",
        limit: int = 100,
        lookback_seconds: float = 6 * 3600,
    ) -> dict[str, list[Span]]:
        """Search traces the way the Jaeger UI does (GET /api/traces?service=&tags=): trace id -> spans.

        A trace matches when one of its spans has every tag (span attributes,
        resource attributes and event fields are searched).
        """
        now_us = int(time.time() * 1_000_000)
        params: dict[str, Any] = {
            "service": service,
            "limit": limit,
            "start": now_us - int(lookback_seconds * 1_000_000),
            "end": now_us + 60_000_000,
        }
        if tags:
            params["tags"] = json.dumps(tags)
        if operation:
            params["operation"] = operation
        body = self._get("/api/traces", params) or {}
        out: dict[str, list[Span]] = {}
        for trace in body.get("data") or ():
            spans = _spans(trace)
            if spans:
                out[spans[0].trace_id] = spans
        return out

    def services(self) -> list[str]:
        return sorted((self._get("/api/services") or {}).get("data") or ())

    def operations(self, service: str) -> list[str]:
        body = self._get(f"/api/services/{urllib.parse.quote(service, safe='')}/operations") or {}
        return sorted(body.get("data") or ())
