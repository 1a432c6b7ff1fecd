"""More accept loops for the hot methods of grpcio's asyncio server.

    acceptors = Acceptors(server, {"/sidecar.v1.ToolGate/Authorize": handler}, loops_per_method=4)
    await server.start()
    await acceptors.start()     # after the server: the loops ask its core for calls
    ...
    await server.stop(grace)    # the core fails the pending requests; the loops end
    await acceptors.stop()

Why: grpcio's `grpc.aio` server keeps one request for a new call outstanding
per method (`AioServer._server_main_loop` in grpcio's
`_cygrpc/aio/server.pyx.pxi`): a call is accepted, the request is renewed,
and the next call waits in gRPC's core until that renewal has gone round
the event loop and through grpcio's poller thread. Under load a round of a
busy event loop takes long, so calls wait in the core before the gate sees
them, and each call pays the rounds and thread wake-ups on its own. With
several requests outstanding, the calls that arrived together are taken
together (docs/performance.md, "Accept loops": more calls per second, and
less CPU per call).

How: each loop does what grpcio's own loop does for a registered method —
`AioServer._request_registered_call`, then `_handle_rpc` scheduled through
`_schedule_rpc_coro` (which also listens for the client's cancellation).
These are grpcio internals, not its API, so `supported()` checks that they
are there with the signatures used here; when they are not (another grpcio
release), the server runs with grpcio's own loop alone and says so in the
log: slower, never wrong. tests/test_core_accept.py checks that the loops
take calls on the grpcio `make install` installs, so an upgrade that drops
them fails there.

Limits: the loops run no server interceptors and no
`maximum_concurrent_rpcs` limiter; the sidecar's server uses neither.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Mapping

import grpc
from grpc._cython import cygrpc

log = logging.getLogger(__name__)

# The grpcio internals the loops call, and the parameters they take there.
_HANDLE_RPC_PARAMETERS = ("method_name", "method_resolver", "interceptors", "rpc_state", "loop", "concurrency_exceeded")
_SCHEDULE_PARAMETERS = ("rpc_coro", "rpc_state", "loop", "method_name")


def _parameters(function: object) -> tuple[str, ...]:
    code = getattr(function, "__code__", None)
    return tuple(code.co_varnames[: code.co_argcount]) if code is not None else ()


def supported() -> str:
    """"" when this grpcio has the internals the loops use; else what is missing."""
    missing = [
        name
        for name, wanted in (("_handle_rpc", _HANDLE_RPC_PARAMETERS), ("_schedule_rpc_coro", _SCHEDULE_PARAMETERS))
        if _parameters(getattr(cygrpc, name, None)) != wanted
    ]
    if not hasattr(cygrpc, "_MethodResolver"):
        missing.append("_MethodResolver")
    if not hasattr(getattr(cygrpc, "AioServer", None), "_request_registered_call"):
        missing.append("AioServer._request_registered_call")
    return f"grpcio {grpc.__version__} has no {', '.join(missing)} as expected" if missing else ""


class Acceptors:
    """`loops_per_method` extra accept loops for each of `handlers` on one `grpc.aio` server.

    `handlers` maps a full method name (`/package.Service/Method`) to the handler the
    server already serves it with. The methods are registered with the server here,
    so build this before `server.start()`. `loops_per_method` 0 leaves the server as it is.
    """

    def __init__(self, server: grpc.aio.Server, handlers: Mapping[str, grpc.RpcMethodHandler], *, loops_per_method: int):
        self.accepted = 0  # calls these loops took (grpcio's own loop takes the rest)
        self._handlers = dict(handlers)
        self._loops = loops_per_method
        self._tasks: set[asyncio.Task] = set()
        self._calls: set[asyncio.Task] = set()  # the event loop holds only weak references to tasks
        self._core = getattr(server, "_server", None)  # grpcio's AioServer under grpc.aio.Server
        self.unsupported = supported() if loops_per_method > 0 else ""
        if not self.unsupported and not hasattr(self._core, "is_running"):
            self.unsupported = f"grpc.aio.Server of grpcio {grpc.__version__} has no grpcio AioServer as _server"
        if loops_per_method <= 0 or self.unsupported:
            return
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for method, handler in self._handlers.items():
            service, _, name = method.lstrip("/").partition("/")
            by_service.setdefault(service, {})[name] = handler
        for service, methods in by_service.items():
            server.add_registered_method_handlers(service, methods)

    async def start(self) -> None:
        """Start the loops on the running event loop (the server must be started)."""
        if self._loops <= 0:
            return
        if self.unsupported:
            log.warning("gRPC: one accept loop per method (grpcio's own): %s", self.unsupported)
            return
        resolver = cygrpc._MethodResolver([], self._handlers)
        for method in self._handlers:
            for _ in range(self._loops):
                task = asyncio.create_task(self._accept(method, resolver), name=f"accept {method}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _accept(self, method: str, resolver: object) -> None:
        loop = asyncio.get_running_loop()
        name = method.encode()
        while self._core.is_running():
            try:
                rpc_state = await self._core._request_registered_call(name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the core failed the request: shutting down, or a fault
                if self._core.is_running():
                    log.error("gRPC: an extra accept loop for %s stopped (the others serve on): %r", method, exc)
                return
            self.accepted += 1
            handling = cygrpc._handle_rpc(method, resolver, (), rpc_state, loop, False)
            call = loop.create_task(cygrpc._schedule_rpc_coro(handling, rpc_state, loop, method))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def stop(self) -> None:
        """End the loops (after `server.stop`, whose shutdown fails their pending requests)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
