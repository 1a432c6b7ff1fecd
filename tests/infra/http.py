"""A real HTTP server for a test's upstream: an aiohttp application on a free loopback port.

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serve_app(app) as base:      # "http://127.0.0.1:<port>" ("https://" with ssl_context)
        ...                                 # stopped (connections closed) on leaving
"""

from __future__ import annotations

import contextlib
import ssl
from typing import AsyncIterator

from aiohttp import web


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, *, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        scheme = "https" if ssl_context is not None else "http"
        yield f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


# Every variable an HTTP client may take a proxy from (httpx reads them by default).
PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@contextlib.asynccontextmanager
async def recording_proxy() -> AsyncIterator[tuple[dict[str, str], list[str]]]:
    """A server standing for a proxy, answering 502 and recording every request that reaches it; yields
    (the environment pointing every proxy variable at it, with NO_PROXY removed; what reached it)."""
    import os

    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.raw_path} authorization={request.headers.get('authorization', '')}")
        return web.Response(status=502)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    async with serve_app(app) as base:
        env = {k: v for k, v in os.environ.items() if k not in ("NO_PROXY", "no_proxy")}
        yield {**env, **{name: base for name in PROXY_VARIABLES}}, seen
