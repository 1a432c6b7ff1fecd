"""TEST DOUBLE: an in-process OTLP/gRPC trace receiver on loopback, for what the real Jaeger cannot do.

Tests that need "a collector that receives spans" use the real Jaeger
(tests/infra/jaeger.py): the sidecar's spans end to end, OTLP/HTTP, the
escalation trace, a collector that is down (connections refused), restarted
during load, or hung (SIGSTOP) are in tests/test_jaeger_*.py and
tests/test_evidence_e2e.py. Jaeger cannot be told to answer an export with an
error; that is what this double is for (`mode = "fail"`, in
tests/test_evidence_otel.py), and GarbageListener below for a port that
answers bytes that are not OTLP at all. The other recorder-level tests there still use
it too and have their end-to-end counterparts against Jaeger.

It speaks the real OTLP protocol through opentelemetry-proto's
TraceServiceServicer and can be told to misbehave:

- `mode = "ok"`: acknowledge and keep the spans;
- `mode = "fail"`: answer UNAVAILABLE (the collector is overloaded / restarting);
- `delay = 0.5`: answer slowly;
- `stop()` / `start()`: go down and come back on the same port.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    attributes: dict
    resource: dict
    events: tuple
    status_code: int
    start_time_unix_nano: int
    end_time_unix_nano: int


def _value(any_value):
    which = any_value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, which) if which else None


def _attrs(key_values) -> dict:
    return {kv.key: _value(kv.value) for kv in key_values}


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: "OtlpReceiver"):
        self.receiver = receiver

    def Export(self, request, context):
        r = self.receiver
        r.requests += 1
        if r.delay:
            time.sleep(r.delay)
        if r.mode == "fail":
            r.refused += 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "test double: collector unavailable")
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attrs(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            attributes=_attrs(span.attributes),
                            resource=resource,
                            events=tuple((e.name, _attrs(e.attributes)) for e in span.events),
                            status_code=span.status.code,
                            start_time_unix_nano=span.start_time_unix_nano,
                            end_time_unix_nano=span.end_time_unix_nano,
                        )
                    )
        with r.lock:
            r.spans.extend(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self, port: int = 0):
        self.port = port
        self.mode = "ok"
        self.delay = 0.0
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.refused = 0
        self.lock = threading.Lock()
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OtlpReceiver":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def span_ids(self) -> set[str]:
        with self.lock:
            return {s.span_id for s in self.spans}

    def by_name(self, prefix: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.name.startswith(prefix)]

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:  # as soon as it holds; room for a loaded machine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return predicate(self)

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class GarbageListener:
    """TEST DOUBLE: a TCP listener that answers whatever it is sent with bytes that are not HTTP/2 or gRPC.

    What a collector port looks like when something else answers on it (a
    misrouted proxy, a half-started process); no real collector answers so.
    `port` is fixed at start; close() frees it for the real Jaeger.
    """

    REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot otlp\n"

    def __init__(self) -> None:
        import socket

        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, name="garbage-listener", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return  # closed
            self.connections += 1
            with conn:
                try:
                    conn.settimeout(2)
                    conn.recv(65536)
                    conn.sendall(self.REPLY)
                except OSError:
                    pass

    def close(self) -> None:
        self._socket.close()
        self._thread.join(5)

    def __enter__(self) -> "GarbageListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
