"""The extra accept loops (sidecar/accept.py) on a real grpc.aio server over a unix socket.

The loops use grpcio internals: these tests are what says, on the grpcio installed, that the
loops take calls, hand the handler the same context grpcio's own loop does (peer, metadata,
deadline, the client's cancellation), stop with the server, and that a grpcio without
those internals still serves, through its own loop.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from sidecar import accept
from sidecar.accept import Acceptors
from sidecar.config import Config, ConfigError

SERVICE = "test.Echo"
METHOD = f"/{SERVICE}/Say"


class EchoServer:
    """`Say` answers `<request>|<peer>|<x-note metadata>` after `delay` seconds; `started` counts handler entries."""

    def __init__(self, tmp_path, loops: int, delay: float = 0.0):
        self.delay = delay
        self.started = 0
        self.cancelled = asyncio.Event()
        self.socket = f"unix:{tmp_path / 'echo.sock'}"
        handler = grpc.unary_unary_rpc_method_handler(self.say)
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Say": handler}),))
        self.acceptors = Acceptors(self.server, {METHOD: handler}, loops_per_method=loops)
        self.server.add_insecure_port(self.socket)

    async def say(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.started += 1
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        note = dict(context.invocation_metadata()).get("x-note", "")
        return b"|".join((request, context.peer().encode(), note.encode()))

    async def __aenter__(self) -> "EchoServer":
        await self.server.start()
        await self.acceptors.start()
        self.channel = grpc.aio.insecure_channel(self.socket)
        self.say_stub = self.channel.unary_unary(METHOD)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(0)
        await self.acceptors.stop()


def test_the_pinned_grpcio_has_what_the_loops_use():
    assert accept.supported() == ""


async def test_calls_arriving_together_are_taken_by_the_extra_loops_and_answered_right(tmp_path):
    async with EchoServer(tmp_path, loops=4, delay=0.02) as echo:
        answers = await asyncio.gather(
            *(echo.say_stub(f"call-{i}".encode(), metadata=(("x-note", f"n{i}"),), timeout=10) for i in range(64))
        )
        for i, answer in enumerate(answers):
            request, peer, note = answer.split(b"|")
            assert (request, note) == (f"call-{i}".encode(), f"n{i}".encode())
            assert peer.startswith(b"unix:")
        assert echo.started == 64
        assert echo.acceptors.accepted > 0, "every call went through grpcio's own loop: the extra loops took none"
        assert not echo.acceptors.unsupported


async def test_no_extra_loops_leaves_the_server_as_grpcio_built_it(tmp_path):
    async with EchoServer(tmp_path, loops=0, delay=0.01) as echo:
        answers = await asyncio.gather(*(echo.say_stub(b"x", timeout=10) for _ in range(16)))
        assert len(answers) == 16
        assert echo.acceptors.accepted == 0


async def test_a_client_that_gives_up_cancels_the_handler_on_an_extra_loop(tmp_path):
    async with EchoServer(tmp_path, loops=4, delay=60) as echo:
        # Enough calls at once that some land on the extra loops; each gives up after 0.3 s.
        results = await asyncio.gather(*(echo.say_stub(b"slow", timeout=0.3) for _ in range(16)), return_exceptions=True)
        assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
        assert {r.code() for r in results} == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert echo.acceptors.accepted > 0
        await asyncio.wait_for(echo.cancelled.wait(), 10)


async def test_stopping_the_server_ends_the_loops(tmp_path):
    echo = EchoServer(tmp_path, loops=3)
    async with echo:
        assert await echo.say_stub(b"hi", timeout=10)
        loops = set(echo.acceptors._tasks)
        assert len(loops) == 3
    # __aexit__ stopped the server, then the loops: none is left running.
    assert all(task.done() for task in loops)
    assert not echo.acceptors._tasks


async def test_a_graceful_stop_lets_the_calls_the_loops_took_finish(tmp_path):
    echo = EchoServer(tmp_path, loops=4, delay=0.5)
    await echo.__aenter__()
    try:
        calls = [asyncio.ensure_future(echo.say_stub(f"c{i}".encode(), timeout=10)) for i in range(16)]

        async def all_in_their_handlers() -> None:
            while echo.started < 16:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(all_in_their_handlers(), 10)
        assert echo.acceptors.accepted > 0
        await echo.server.stop(grace=10)
        answers = await asyncio.gather(*calls)
        assert sorted(a.split(b"|")[0] for a in answers) == sorted(f"c{i}".encode() for i in range(16))
    finally:
        await echo.channel.close()
        await echo.acceptors.stop()
    assert not echo.acceptors._tasks


async def test_a_grpcio_without_the_internals_serves_through_its_own_loop(tmp_path, monkeypatch, caplog):
    # grpcio's own loop calls the same internals, so they are left alone: the loops are told
    # to expect another signature, as with a grpcio release that changed it.
    monkeypatch.setattr(accept, "_HANDLE_RPC_PARAMETERS", ("method_name", "rpc_state", "loop"))
    assert "_handle_rpc" in accept.supported()
    with caplog.at_level(logging.WARNING, logger="sidecar.accept"):
        async with EchoServer(tmp_path, loops=4, delay=0.01) as echo:
            answers = await asyncio.gather(*(echo.say_stub(b"x", timeout=10) for _ in range(16)))
    assert len(answers) == 16
    assert echo.acceptors.accepted == 0
    assert "one accept loop per method" in caplog.text and "_handle_rpc" in caplog.text


@pytest.mark.parametrize("loops", [-1, 65, 1000])
def test_accept_loops_out_of_range_is_a_config_error(loops):
    config = Config()
    config.listen.accept_loops = loops
    with pytest.raises(ConfigError, match="listen.accept_loops"):
        config.validate()
