"""sidecar/policy/opa/transport.py: the keep-alive HTTP/1.1 pool the OPA client decides through.

The real OPA is behind every test of the client (test_opa_client.py,
test_opa_sidecar.py); here a raw HTTP server on a unix socket (`RawServer`, a
test double) produces what OPA never does on purpose: chunked and
Connection: close answers, idle connections closed under the client, answers
that break off, bytes nobody asked for, answers too large to be a decision.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from sidecar.policy.opa.transport import MAX_ANSWER_BYTES, ConnectionProblem, HttpPool

OK = b'{"result": true}'


def answer(body: bytes = OK, *, headers: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
            .encode() + body)


async def until(condition, timeout: float = 30.0) -> None:
    """Until `condition()` holds (polled), or fail after a deadline generous for a loaded machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class RawServer:
    """TEST DOUBLE: an HTTP/1.1 server on a unix socket whose answers the test writes byte by byte.

    `script` is a list of callables, one per request in arrival order (the last repeats):
    `await step(request_bytes, writer)` writes whatever it likes and may close the connection.
    """

    def __init__(self, path: Path):
        self.path = path
        self.script = [lambda request, writer: self._write(writer, answer())]
        self.requests: list[bytes] = []
        self.connections = 0
        self.open_connections = 0
        self.most_open = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def __aenter__(self) -> "RawServer":
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        self.close_all()
        await self._server.wait_closed()

    def close_all(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        self.most_open = max(self.most_open, self.open_connections)
        self._writers.append(writer)
        self.reader = reader  # the latest connection's: a step can watch it for the client closing
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                step = self.script[min(len(self.requests) - 1, len(self.script) - 1)]
                await step(request, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self.open_connections -= 1
            writer.close()


@pytest.fixture
async def server():
    directory = Path(tempfile.mkdtemp(prefix="opa-t-"))
    async with RawServer(directory / "raw.sock") as raw:
        yield raw
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def pool(server):
    pools: list[HttpPool] = []

    def make(max_connections: int = 4) -> HttpPool:
        pools.append(HttpPool(server.url, max_connections=max_connections))
        return pools[-1]

    yield make
    for made in pools:
        await made.aclose()


async def post(pool: HttpPool, body: bytes = b'{"input": {}}'):
    return await pool.post("/v1/data/sidecar/decision?provenance=true", body, content_type="application/json")


async def test_keep_alive_reuses_one_connection_and_sends_the_body_exactly(server, pool):
    client = pool()
    body = '{"input": {"path": "/workspace/\u00e9t\u00e9 \\u0000"}}'.encode()
    for _ in range(5):
        response = await post(client, body)
        assert (response.status, response.body) == (200, OK)
    assert server.connections == 1
    head, sent = server.requests[0].split(b"\r\n\r\n", 1)
    assert sent == body
    assert head.startswith(b"POST /v1/data/sidecar/decision?provenance=true HTTP/1.1\r\n")
    assert f"content-length: {len(body)}".encode() in head.lower()


async def test_a_chunked_answer_comes_back_whole(server, pool):
    async def chunked(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"7\r\n{\"resul\r\n9\r\nt\": true}\r\n0\r\n\r\n")
    server.script = [chunked]
    client = pool()
    assert (await post(client)).body == OK
    assert (await post(client)).body == OK
    assert server.connections == 1  # chunked answers keep the connection


async def test_an_answer_without_a_declared_length_ends_when_the_connection_closes(server, pool):
    async def until_close(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK)
        writer.close()  # RFC 9112 section 6.3: the body is what came before the close
    server.script = [until_close, lambda r, w: RawServer._write(w, answer(b'{"result": 2}'))]
    client = pool()
    assert (await post(client)).body == OK
    assert (await post(client)).body == b'{"result": 2}'
    assert server.connections == 2


async def test_connection_close_is_honoured(server, pool):
    async def closing(request, writer):
        writer.write(answer(headers="Connection: close\r\n"))
        writer.close()
    server.script = [closing]
    client = pool()
    for _ in range(3):
        assert (await post(client)).body == OK
    assert server.connections == 3


async def test_an_idle_connection_closed_by_opa_is_replaced_without_failing_the_call(server, pool):
    client = pool()
    assert (await post(client)).status == 200
    server.close_all()  # OPA restarted or timed the idle connection out
    await asyncio.sleep(0.05)
    assert (await post(client)).status == 200
    assert server.connections == 2


async def test_a_stale_connection_that_dies_as_it_is_reused_is_retried_once_on_a_new_one(server, pool):
    async def drop(request, writer):
        writer.close()  # read the request, then closed without a byte of answer
    server.script = [lambda r, w: RawServer._write(w, answer()), drop, lambda r, w: RawServer._write(w, answer())]
    client = pool()
    assert (await post(client)).status == 200
    assert (await post(client)).status == 200  # the reused connection dropped it; a new one answered
    assert len(server.requests) == 3 and server.connections == 2


async def test_a_new_connection_closed_without_an_answer_is_not_retried(server, pool):
    async def drop(request, writer):
        writer.close()
    server.script = [drop]
    with pytest.raises(ConnectionProblem, match="closed the connection without answering") as caught:
        await post(pool())
    assert not caught.value.answered
    assert len(server.requests) == 1


async def test_an_answer_that_breaks_off_is_not_retried(server, pool):
    async def half(request, writer):
        writer.write(answer()[:-5])
        writer.close()
    server.script = [lambda r, w: RawServer._write(w, answer()), half]
    client = pool()
    await post(client)
    with pytest.raises(ConnectionProblem, match="broke off its answer") as caught:
        await post(client)  # even on a reused connection: OPA received this request
    assert caught.value.answered
    assert len(server.requests) == 2


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 2000 OK\r\n\r\n", b"\x00\x01\x02\r\n\r\n"])
async def test_an_answer_that_is_not_http_is_a_problem(server, pool, garbage):
    async def nonsense(request, writer):
        writer.write(garbage)
    server.script = [nonsense]
    with pytest.raises(ConnectionProblem, match="not HTTP/1.1"):
        await post(pool())


async def test_bytes_after_the_answer_end_the_connection(server, pool):
    async def extra(request, writer):
        writer.write(answer() + answer(b'{"result": "smuggled"}'))
    server.script = [extra, lambda r, w: RawServer._write(w, answer(b'{"result": 2}'))]
    client = pool()
    assert (await post(client)).body == OK
    await asyncio.sleep(0.05)
    second = await post(client)
    assert second.body == b'{"result": 2}'  # never the answer nobody asked for
    assert server.connections == 2


async def test_a_cancelled_request_closes_its_connection_so_a_late_answer_is_never_read(server, pool):
    closed_by_client = asyncio.Event()

    async def late(request, writer):
        reader = server.reader
        if await asyncio.wait_for(reader.read(), 30) == b"":  # EOF: the client hung up (30 s: a loaded machine)
            closed_by_client.set()
        writer.write(answer(b'{"result": "late"}'))

    server.script = [late, lambda r, w: RawServer._write(w, answer())]
    client = pool()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await post(client)
    await asyncio.wait_for(closed_by_client.wait(), 30)  # not left open until the late answer (EOF or bust)
    assert (await post(client)).body == OK
    assert server.connections == 2


async def test_at_most_max_connections_are_open_and_the_rest_wait(server, pool):
    gate = asyncio.Event()

    async def slow(request, writer):
        await gate.wait()
        writer.write(answer())

    server.script = [slow]
    client = pool(max_connections=3)
    calls = [asyncio.create_task(post(client)) for _ in range(10)]
    await until(lambda: len(server.requests) >= 3)  # the first three reached OPA (not: 0.1 s passed)
    await asyncio.sleep(0.1)  # room for a fourth connection, if the pool wrongly opened one
    assert server.open_connections == 3 and len(server.requests) == 3
    gate.set()
    assert all(r.status == 200 for r in await asyncio.gather(*calls))
    assert server.most_open == 3


async def test_an_answer_larger_than_any_decision_is_refused(server, pool):
    async def huge(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_ANSWER_BYTES + 10))
        chunk = b"x" * 65536
        for _ in range(MAX_ANSWER_BYTES // len(chunk) + 2):
            if writer.is_closing():
                return
            writer.write(chunk)
            await writer.drain()

    server.script = [huge]
    with pytest.raises(ConnectionProblem, match=f"more than {MAX_ANSWER_BYTES} bytes"):
        await post(pool())


async def test_nobody_listening_is_unreachable(tmp_path):
    client = HttpPool(f"unix://{tmp_path}/nobody.sock", max_connections=2)
    with pytest.raises(ConnectionProblem, match="is unreachable"):
        await post(client)
    refused = HttpPool("http://127.0.0.1:1", max_connections=2)
    with pytest.raises(ConnectionProblem, match="is unreachable: connection refused"):
        await post(refused)


async def test_a_closed_pool_fails_requests_on_the_wire_and_refuses_new_ones(server, pool):
    async def never(request, writer):
        await asyncio.sleep(30)

    server.script = [never]
    client = pool()
    pending = asyncio.create_task(post(client))
    await until(lambda: len(server.requests) == 1)  # on the wire, as the test says (not: 0.05 s passed)
    await client.aclose()
    with pytest.raises(ConnectionProblem):
        await pending
    with pytest.raises(ConnectionProblem, match="client is closed"):
        await post(client)


@pytest.mark.parametrize("url", ["ftp://opa:21", "opa:8181", "http://", "file:///tmp/x"])
def test_urls_that_are_not_opa_are_refused(url):
    with pytest.raises(ValueError, match="not an OPA URL"):
        HttpPool(url, max_connections=1)


async def test_a_url_path_prefix_and_host_header_reach_the_server(tmp_path):
    seen: list[bytes] = []

    async def serve(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        await reader.readexactly(2)
        writer.write(answer())
        await writer.drain()
        writer.close()

    tcp = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    client = HttpPool(f"http://127.0.0.1:{port}/opa/", max_connections=1)
    try:
        assert (await client.post("/v1/data/x", b"{}", content_type="application/json")).body == OK
    finally:
        await client.aclose()
        tcp.close()
        await tcp.wait_closed()
    assert seen[0].startswith(b"POST /opa/v1/data/x HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}\r\n".encode() in seen[0]
