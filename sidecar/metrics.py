"""Prometheus metrics: what SREs alert on, and the per-stage timing the benchmark reads.

Served on `metrics.listen` (disabled when ""), from the sidecar's own
registry so several sidecars can live in one test process.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

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
        self._server = None

    def observe(self, outcome: str, engine: str, failed: bool, timings_ms: dict[str, float]) -> None:
        self.decisions.labels(outcome, engine or "none").inc()
        if failed:
            self.failures.labels(engine or "none").inc()
        for stage, milliseconds in timings_ms.items():
            self.stage_seconds.labels(stage).observe(milliseconds / 1000)

    def serve(self, listen: str) -> int:
        """Serve /metrics on host:port in a background thread; return the bound port."""
        host, _, port = listen.rpartition(":")
        self._server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        bound = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
