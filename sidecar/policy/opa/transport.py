"""HTTP/1.1 to one OPA: a pool of keep-alive connections, for the decision on every tool call.

    pool = HttpPool("unix:///run/opa.sock", max_connections=32)
    response = await pool.post("/v1/data/sidecar/decision", body, content_type="application/json")
    response.status, response.body      # int, bytes (chunked answers come back whole)
    await pool.aclose()

`url` is `unix:///path` (the managed OPA), `http://host[:port][/prefix]` or
`https://...` (verified against the system's CAs). At most `max_connections`
requests are on the wire at once; the rest wait for a connection.

Errors: every way of not getting a whole answer raises `ConnectionProblem`,
whose `detail` completes "OPA at <url> ..." (`is unreachable: connection
refused`, `closed the connection without answering`, `broke off its answer:
...`, `answered something that is not HTTP/1.1: ...`). A request cancelled by
the caller's time budget closes its connection, so a late answer can never
be read as the answer to the next request.

A connection that sat idle in the pool may have been closed by OPA (a
restart, its idle timeout) just as it is reused: when such a connection
closes without a byte of answer, the request is sent once more on a new
connection. That is safe because a decision query has no side effects (RFC
9112 section 9.3.1 allows retrying such requests automatically).

Why not aiohttp, which the sidecar uses elsewhere: this is the one HTTP
exchange on every tool call, and aiohttp's per-request machinery (session,
request and response objects, cookie and redirect handling) cost 0.18 ms of
the interpreter per decision against OPA's unix socket, this pool 0.06 ms
(docs/performance.md). Parsing is not ours: answers are read by httptools,
the binding of llhttp (Node.js's HTTP parser) that uvicorn uses.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

MAX_ANSWER_BYTES = 8 * 1024 * 1024  # far above any decision; a server that streams more is not OPA


class ConnectionProblem(Exception):
    """No whole answer: `detail` says why, to follow "OPA at <url> ".

    `answered` is False when not a byte of answer arrived (the request may not have
    reached OPA); True when an answer began and broke off or could not be parsed.
    """

    def __init__(self, detail: str, *, answered: bool = False):
        super().__init__(detail)
        self.detail = detail
        self.answered = answered


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time (no pipelining)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[Response] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._received = False
        self._close_after = False
        self._framed = False  # the answer declared its length (Content-Length or chunked)
        self._headers_done = False
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            # Bytes nobody asked for: the exchange is out of step, this connection is done.
            self.close()
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionProblem(f"answered something that is not HTTP/1.1: {exc}", answered=True))
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost settles a pending request

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            if self._headers_done and not self._framed and exc is None:
                # No declared length: the body is what came before the close (RFC 9112 section 6.3).
                self._answer.set_result(Response(self._parser.get_status_code(), b"".join(self._body)))
            elif not self._received:
                self._fail(ConnectionProblem("closed the connection without answering"))
            else:
                self._fail(ConnectionProblem("broke off its answer: the connection closed mid-answer", answered=True))

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._answer is None or self._answer.done():  # an answer to no request: out of step
            self._close_after = True

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"connection" and value.strip().lower() == b"close":
            self._close_after = True
        elif name in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_ANSWER_BYTES:
            self._fail(ConnectionProblem(f"answered more than {MAX_ANSWER_BYTES} bytes", answered=True))
            self.close()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._answer is not None and not self._answer.done():
            if not self._parser.should_keep_alive():
                self._close_after = True
            self._answer.set_result(Response(self._parser.get_status_code(), b"".join(self._body)))

    # ours
    @property
    def reusable(self) -> bool:
        return not self.closed and not self._close_after and self._transport is not None \
            and not self._transport.is_closing()

    async def exchange(self, request: bytes) -> Response:
        assert self._transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self._body, self._size, self._received = [], 0, False
        self._framed = self._headers_done = False
        self._transport.write(request)
        try:
            return await self._answer
        finally:
            if not self._answer.done() or self._answer.cancelled():  # cancelled: a late answer must not linger
                self.close()
            self._answer = None

    def _fail(self, problem: ConnectionProblem) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(problem)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one OPA (see the module docstring)."""

    def __init__(self, url: str, *, max_connections: int):
        if url.startswith("unix://"):
            self._socket: str | None = url[len("unix://"):]
            self._host, self._port, self._ssl, self._prefix = "opa", 0, None, ""
            self._host_header = "localhost"
        else:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an OPA URL: {url!r} (unix:///path, http://host[:port] or https://...)")
            self._socket = None
            self._host = parts.hostname
            self._port = parts.port or (443 if parts.scheme == "https" else 80)
            self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
            self._prefix = parts.path.rstrip("/")
            self._host_header = parts.netloc
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open: set[_Connection] = set()
        self._closed = False

    async def post(self, path: str, body: bytes, *, content_type: str) -> Response:
        """POST `body` to `path` (the URL's path prefix is added); raise ConnectionProblem."""
        request = (
            f"POST {self._prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"Content-Type: {content_type}\r\nAccept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        async with self._slots:
            connection, reused = self._take_idle(), True
            if connection is None:
                connection, reused = await self._connect(), False
            try:
                response = await connection.exchange(request)
            except ConnectionProblem as problem:
                connection.close()
                if not reused or problem.answered:
                    raise
                connection = await self._connect()  # a stale keep-alive connection: once more, on a new one
                try:
                    response = await connection.exchange(request)
                except ConnectionProblem:
                    connection.close()
                    raise
            finally:
                if connection.closed:
                    self._open.discard(connection)
            if connection.reusable and not self._closed:
                self._idle.append(connection)
            else:
                connection.close()
                self._open.discard(connection)
            return response

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely to have timed out
            if connection.reusable:
                return connection
            self._open.discard(connection)
        return None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ConnectionProblem("is not being called: the client is closed")
        loop = asyncio.get_running_loop()
        try:
            if self._socket is not None:
                _, connection = await loop.create_unix_connection(_Connection, self._socket)
            else:
                _, connection = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except ConnectionRefusedError:
            raise ConnectionProblem("is unreachable: connection refused") from None
        except ssl.SSLError as exc:
            raise ConnectionProblem(f"is unreachable: TLS failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ConnectionProblem(f"is unreachable: {exc.strerror or type(exc).__name__}") from None
        self._open.add(connection)
        return connection

    async def aclose(self) -> None:
        """Close every connection; requests still on the wire fail with ConnectionProblem."""
        self._closed = True
        self._idle.clear()
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        await asyncio.sleep(0)  # let the transports run their connection_lost callbacks
