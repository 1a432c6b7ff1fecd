"""Prometheus metrics: what SREs alert on, and the per-stage timing the benchmark reads.

Served on `metrics.listen` (disabled when ""), from the sidecar's own
registry so several sidecars can live in one test process. The socket is
bound before the sidecar starts anything (sidecar/listeners.py) and handed
to `serve`, so a port in use refuses the start, not a half-started sidecar.
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.metrics import MetricWrapperBase

log = logging.getLogger(__name__)

# From 50 µs to 1 s: decisions are sub-millisecond when healthy.
_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "sidecar_decisions",
            "Tool-call decisions by outcome and the engine that made them",
            ["outcome", "engine"],
            registry=self.registry,
        )
        self.failures = Counter(
            "sidecar_fail_closed",
            "Decisions denied because a stage failed (engine error, timeout, evidence or usage store unavailable)",
            ["engine"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "sidecar_stage_seconds",
            "Time spent per pipeline stage for one decision: engine, evidence (durable write), total",
            ["stage"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.shadow_decisions = Counter(
            "sidecar_shadow_decisions",
            "Calls the shadow bundle (policy.shadow_dir) also decided, by the real and the shadow outcome "
            "(equal labels: agreement; different: a transition)",
            ["recorded", "shadow"],
            registry=self.registry,
        )
        self.shadow_errors = Counter(
            "sidecar_shadow_errors",
            "Calls the shadow bundle could not decide (its OPA failed or exceeded policy.shadow_timeout_ms)",
            registry=self.registry,
        )
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}  # _child
        self._server = None

    def observe_shadow(self, recorded: str, shadow: str, failed: bool) -> None:
        if failed:
            self.shadow_errors.inc()
        else:
            self.shadow_decisions.labels(recorded, shadow).inc()

    def observe(self, outcome: str, engine: str, failed: bool, timings_ms: dict[str, float]) -> None:
        """One decision: its outcome, whether it failed closed, and its stages' times (ms)."""
        engine = engine or "none"
        self._child(self.decisions, outcome, engine).inc()
        if failed:
            self._child(self.failures, engine).inc()
        for stage, milliseconds in timings_ms.items():
            self._child(self.stage_seconds, stage).observe(milliseconds / 1000)

    def _child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        """`metric.labels(*labels)`, remembered: every call observes the same few label sets,
        and `labels()` checks and locks each time."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def serve(self, sock: socket.socket) -> int:
        """Serve /metrics on the bound, listening `sock` in a background thread; return its port."""
        server = _MetricsServer(sock, make_wsgi_app(self.registry))
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self._server = server
        host, port = sock.getsockname()[:2]
        log.info("metrics on http://%s:%d/metrics", host, port)
        return port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """No access line per scrape on stderr."""


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """The WSGI server prometheus_client's start_http_server makes, on a socket bound beforehand."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, app: object):
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], _Quiet, bind_and_activate=False)
        self.socket.close()  # the unbound one socketserver made
        self.socket = sock
        sock.setblocking(True)  # socketserver polls, then accepts on a blocking socket
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = self.server_address[0], self.server_address[1]
        self.setup_environ()
        self.set_app(app)
