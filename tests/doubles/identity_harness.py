"""TEST HELPERS for the identity tests: fake agents, a source on them, a probe server.

Not production code.
- `short_dir()`: unix socket paths must stay under ~108 bytes, so sockets go
  in a fresh /tmp directory rather than pytest's long tmp_path.
- `FakeAgent`: a FakeWorkloadApi (tests/doubles/fake_workload_api.py) with
  an identity and JWT bundles, started.
- `ProbeServer`: a real grpc.aio server that answers each call with what an
  identity resolver made of it, over unix, plaintext TCP and mTLS, with
  the sidecar servicer's own `peer_info` (PeerInfo from the grpc context).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.identity import IdentityError
from sidecar.servicer import peer_info
from tests.doubles.fake_workload_api import FakeWorkloadApi

SIDECAR_DNS = "sidecar.local"  # python grpc clients check the server's hostname
METHOD = "/test.IdentityProbe/Who"


def short_dir() -> str:
    return tempfile.mkdtemp(prefix="spf", dir="/tmp")


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fake_agent(directory: str, name: str = "agent.sock", *, path: str = "/ns/agents/sa/agent",
               trust_domain: str = "example.org", ttl: float = 3600.0, **kwargs: Any) -> FakeWorkloadApi:
    api = FakeWorkloadApi(os.path.join(directory, name), trust_domain, **kwargs).start()
    api.set_identity(path, ttl=ttl, dns_names=(SIDECAR_DNS,))
    api.publish_jwt_bundles()
    return api


class ProbeServer:
    """A grpc.aio server whose one method returns the resolved subject or the deny reason."""

    def __init__(self, resolver, directory: str):
        self.resolver = resolver
        self.unix_path = os.path.join(directory, "probe.sock")
        self.server: grpc.aio.Server | None = None
        self.tcp_port = 0
        self.tls_port = 0
        self.calls = 0

    async def start(self, tls_credentials: grpc.ServerCredentials | None = None) -> "ProbeServer":
        from sidecar.identity.factory import GRPC_SERVER_OPTIONS

        self.server = grpc.aio.server(options=list(GRPC_SERVER_OPTIONS))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(
                "test.IdentityProbe", {"Who": grpc.unary_unary_rpc_method_handler(self._who)}),)
        )
        self.server.add_insecure_port(f"unix:{self.unix_path}")
        self.tcp_port = self.server.add_insecure_port("127.0.0.1:0")
        if tls_credentials is not None:
            self.tls_port = self.server.add_secure_port("127.0.0.1:0", tls_credentials)
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    async def _who(self, request: bytes, context) -> bytes:
        self.calls += 1
        peer = peer_info(context)
        try:
            identity = self.resolver.resolve(peer)
        except IdentityError as exc:
            return json.dumps({"denied": exc.reason, "transport": peer.transport}).encode()
        return json.dumps(
            {
                "subject": identity.subject.to_input(),
                "delegation": [link.to_input() for link in identity.delegation],
                "transport": peer.transport,
            }
        ).encode()


async def ask(target: str, *, credentials: grpc.ChannelCredentials | None = None,
              metadata: list[tuple[str, str]] | None = None) -> dict:
    """One call on a fresh channel (so a TLS handshake happens each time)."""
    options = [("grpc.ssl_target_name_override", SIDECAR_DNS)] if credentials else []
    channel = (grpc.aio.secure_channel(target, credentials, options=options) if credentials
               else grpc.aio.insecure_channel(target))
    try:
        reply = await channel.unary_unary(METHOD)(b"", timeout=5, metadata=metadata)
        return json.loads(reply)
    finally:
        await channel.close()


def bearer(token: str) -> Callable[[], tuple[tuple[str, str], ...]]:
    """`metadata=` for a client: `token` (a JWT-SVID) as the caller's bearer credential."""
    return lambda: (("authorization", f"Bearer {token}"),)


async def until_serving(address: str, timeout: float = 60.0) -> None:
    """Until the sidecar's health check answers SERVING (its own SVID comes from the Workload API in the
    background); fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        while True:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            assert time.monotonic() < deadline, f"the sidecar at {address} never became SERVING"
            await asyncio.sleep(0.05)


def client_credentials(svid, bundle_pem: bytes) -> grpc.ChannelCredentials:
    """mTLS client credentials from a test SVID (tests/doubles/pki.py)."""
    return grpc.ssl_channel_credentials(bundle_pem, svid.key_pem(), svid.chain_pem())
