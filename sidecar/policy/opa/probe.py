"""`GET /health` on OPA from a worker thread: a verdict a busy event loop cannot spoil.

    answer = await probe("unix:///run/opa.sock", "/health?bundles=true", timeout=0.5)
    answer.status    # OPA's HTTP status; 0 when it did not answer within `timeout`
    answer.problem   # why there was no answer ("" when there was one)

Under saturation the sidecar's event loop runs every callback late. A health
check timed on that loop times out although OPA answered at once: the client
would then hold overload against OPA and open its circuit breaker (every call
denied `policy_unavailable` for a cool-down), and the runner could kill a
healthy OPA as hung. Here the HTTP exchange runs in a thread (stdlib
`http.client`), bounded by socket timeouts, so only a late OPA fails the
check; the loop merely reads the verdict when it gets to it.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class HealthAnswer:
    status: int  # HTTP status, 0 when OPA did not answer
    body: bytes  # at most MAX_BODY bytes of the answer
    problem: str  # "" when OPA answered; else a short reason ("did not answer within 500 ms", "connection refused")


MAX_BODY = 4096


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the OPA at `url` (unix:///path or http(s)://host[:port][/prefix]) and its path prefix."""
    if url.startswith("unix://"):
        return _UnixConnection(url[len("unix://"):], timeout), ""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout,
                                           context=ssl.create_default_context()), parts.path.rstrip("/")
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout), parts.path.rstrip("/")


def get_health(url: str, path: str, timeout: float) -> HealthAnswer:
    """One GET on a fresh connection, all of it within `timeout` seconds (blocking)."""
    deadline = time.monotonic() + timeout
    connection, prefix = _connection(url, timeout)
    try:
        connection.connect()
        connection.sock.settimeout(max(0.001, deadline - time.monotonic()))
        connection.request("GET", prefix + path, headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read(MAX_BODY)
    except (TimeoutError, socket.timeout):
        return HealthAnswer(0, b"", f"did not answer within {timeout * 1000:.0f} ms")
    except ConnectionRefusedError:
        return HealthAnswer(0, b"", "is unreachable: connection refused")
    except (OSError, http.client.HTTPException) as exc:
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return HealthAnswer(0, b"", f"is unreachable: {detail}")
    finally:
        connection.close()
    if time.monotonic() > deadline:
        return HealthAnswer(0, b"", f"did not answer within {timeout * 1000:.0f} ms")
    return HealthAnswer(response.status, body, "")


async def probe(url: str, path: str, timeout: float) -> HealthAnswer:
    """get_health in a worker thread (asyncio.to_thread): OPA's lateness, not the loop's, decides."""
    return await asyncio.to_thread(get_health, url, path, timeout)
