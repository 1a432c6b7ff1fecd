"""grpc.health.v1 for the sidecar, fed by each stage's own health().

SERVING only while every stage can do its job (policy loaded, identity held,
evidence writable). The detail each stage gives (e.g. "last reload rejected:
rego/x.rego:4: ...") is logged when it changes and sent as the
`sidecar-health-detail` trailing metadata of every Check.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

HealthSource = Callable[[], tuple[bool, str]]


class SidecarHealth(health.aio.HealthServicer):
    def __init__(self, sources: dict[str, HealthSource], services: list[str]):
        super().__init__()
        self._sources = sources
        self._services = ["", *services]
        self._detail = ""
        self._serving: bool | None = None

    def snapshot(self) -> tuple[bool, str]:
        serving = True
        parts = []
        for name, source in self._sources.items():
            try:
                ok, detail = source()
            except Exception as exc:
                ok, detail = False, f"health check failed: {exc}"
            serving = serving and ok
            parts.append(f"{name}: {'ok' if ok else 'NOT OK'} ({detail})")
        return serving, "; ".join(parts)

    async def refresh(self) -> None:
        serving, detail = self.snapshot()
        if serving != self._serving or detail != self._detail:
            (log.info if serving else log.warning)("health %s: %s", "SERVING" if serving else "NOT_SERVING", detail)
        self._serving, self._detail = serving, detail
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in self._services:
            await self.set(service, status)

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(interval)

    async def Check(self, request, context):
        detail = self._detail.encode("ascii", "backslashreplace").decode("ascii")
        context.set_trailing_metadata((("sidecar-health-detail", detail),))
        return await super().Check(request, context)
