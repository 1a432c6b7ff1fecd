"""The Workload API goes away: the sidecar serves until its SVID expires, then denies, then recovers."""

from __future__ import annotations

import asyncio
import time

from grpc_health.v1 import health_pb2

from sidecar.client import AsyncClient
from tests.doubles.fake_workload_api import FakeWorkloadApi
from tests.test_identity_sidecar import make_config, sockdir, unix_target, wait_health  # noqa: F401,F811  (fixtures)

SVID_TTL = 4.0


async def test_agent_gone_denies_once_the_svid_expires_and_recovers_when_back(make_config, sockdir, running_sidecar):
    agent = FakeWorkloadApi(f"{sockdir}/agent.sock").start()
    agent.set_identity("/ns/agents/sa/sidecar", ttl=SVID_TTL)
    agent.publish_jwt_bundles()
    ca, jwt_authority = agent.ca, agent.jwt_authority
    sidecar = await running_sidecar(make_config(sources=["workload_api"]))
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
    async with AsyncClient(unix_target(sidecar)) as client:
        assert (await client.authorize("echo", {})).outcome == "allow"
        expires = agent.svids[0].cert.not_valid_after_utc.timestamp()

        agent.stop()  # the SPIRE agent is gone; the held SVID is still valid
        assert (await client.authorize("echo", {})).outcome == "allow"

        await asyncio.sleep(max(0.0, expires - time.time()) + 1.2)
        denied = await client.authorize("echo", {})
        assert denied.outcome == "deny"
        assert denied.reasons[0].startswith("unverified_caller:") and "expired" in denied.reasons[0]
        await wait_health(sidecar, health_pb2.HealthCheckResponse.NOT_SERVING)

        back = FakeWorkloadApi(f"{sockdir}/agent.sock", ca=ca, jwt_authority=jwt_authority).start()
        try:
            back.set_identity("/ns/agents/sa/sidecar", ttl=3600)
            back.publish_jwt_bundles()
            await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING, timeout=15)
            assert (await client.authorize("echo", {})).outcome == "allow"
        finally:
            back.stop()
