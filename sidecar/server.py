"""Compose the sidecar from its config and serve it: gRPC listeners, health, reflection.

This is the one place that knows every stage; each stage is built from its
own config section and used only through its interface.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar.calls import CallIdRegistry
from sidecar.config import Config
from sidecar.evidence import Recorder
from sidecar.gate import Gate, default_instance_id
from sidecar.health import SidecarHealth
from sidecar.identity import IdentityResolver
from sidecar.identity.dev import DevIdentityResolver
from sidecar.policy.embedded import EmbeddedEngine
from sidecar.policy.engine import PolicyEngine
from sidecar.servicer import TOOLGATE_SERVICE, ToolGateServicer
from sidecar.usage import UsageCounters
from sidecar.v1 import sidecar_pb2

log = logging.getLogger(__name__)


def build_engine(config: Config) -> PolicyEngine:
    policy = config.policy
    return EmbeddedEngine(policy.dir, timeout_ms=policy.timeout_ms, workers=policy.workers, reload=policy.reload)


def build_identity(config: Config) -> tuple[IdentityResolver, grpc.ServerCredentials | None]:
    """The caller resolver, and TLS credentials when the TCP listener serves mTLS."""
    return DevIdentityResolver(config.identity.dev_spiffe_id), None


def build_recorder(config: Config) -> Recorder | None:
    return None


def build_gate(config: Config, engine: PolicyEngine, recorder: Recorder | None) -> Gate:
    return Gate(
        engine=engine,
        usage=UsageCounters(config.usage.window_seconds, config.usage.max_tracked),
        call_ids=CallIdRegistry(config.sidecar.call_id_memory),
        recorder=recorder,
        max_input_bytes=config.policy.max_input_bytes,
        max_depth=config.policy.max_depth,
        instance_id=config.sidecar.instance_id or default_instance_id(),
    )


@dataclass
class RunningSidecar:
    """A started sidecar: its server, bound addresses and stages, for `serve` and tests."""

    server: grpc.aio.Server
    addresses: list[str]
    engine: PolicyEngine
    identity: IdentityResolver
    recorder: Recorder | None
    gate: Gate
    health: SidecarHealth
    _health_task: asyncio.Task

    async def stop(self, grace: float = 5.0) -> None:
        self._health_task.cancel()
        await self.server.stop(grace)
        await self.engine.close()
        if self.recorder is not None:
            await self.recorder.close()


async def start_sidecar(config: Config) -> RunningSidecar:
    """Load policy, build every stage, bind the listeners and start serving."""
    engine = build_engine(config)
    await engine.start()
    identity, tls_credentials = build_identity(config)
    recorder = build_recorder(config)
    gate = build_gate(config, engine, recorder)

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", config.policy.max_input_bytes + 64 * 1024)])
    server.add_generic_rpc_handlers((ToolGateServicer(gate, identity).handler(),))
    sources = {"policy": engine.health, "identity": identity.health}
    if recorder is not None:
        sources["evidence"] = recorder.health
    health = SidecarHealth(sources, [TOOLGATE_SERVICE])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            sidecar_pb2.DESCRIPTOR.services_by_name["ToolGate"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )

    addresses = []
    if config.listen.tcp:
        if tls_credentials is not None:
            port = server.add_secure_port(config.listen.tcp, tls_credentials)
        else:
            port = server.add_insecure_port(config.listen.tcp)
        host = config.listen.tcp.rsplit(":", 1)[0]
        addresses.append(f"{host}:{port}")
    if config.listen.unix:
        socket_path = Path(config.listen.unix)
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        if socket_path.exists():
            socket_path.unlink()
        server.add_insecure_port(f"unix:{socket_path}")
        addresses.append(f"unix:{socket_path}")
    await server.start()
    await health.refresh()
    health_task = asyncio.create_task(health.run(), name="health")
    return RunningSidecar(server, addresses, engine, identity, recorder, gate, health, health_task)


async def serve(config: Config) -> None:
    """Run until SIGINT / SIGTERM, then drain in-flight calls and close every stage."""
    sidecar = await start_sidecar(config)
    ident_ok, ident_detail = sidecar.identity.health()
    print(f"agent-sidecar {os.getpid()} serving", flush=True)
    for address in sidecar.addresses:
        print(f"  listening on  {address}", flush=True)
    print(f"  policy        {config.policy.dir} ({sidecar.engine.name} engine, revision {sidecar.engine.revision})", flush=True)
    print(f"  identity      {ident_detail}", flush=True)
    first = sidecar.addresses[0]
    print("Send a first call from another terminal:", flush=True)
    print(
        f"  .venv/bin/python -c \"from sidecar.client import Client; "
        f"print(Client('{first}').authorize('search_docs', {{'query': 'sidecar'}}))\"",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    print("agent-sidecar: stopping, draining in-flight calls", flush=True)
    await sidecar.stop()
