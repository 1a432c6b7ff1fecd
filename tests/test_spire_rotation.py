"""Short-lived SPIRE SVIDs: rotation without a restart, and the agent going away and coming back.

The sidecar's registration here has `-x509SVIDTTL 14`: SPIRE backdates
NotBefore by 10 s, so an SVID lives 24 s and the agent rotates it once no more
than a jittered half of that (10.8-13.2 s) is left, i.e. 0.8-3.2 s after
issuing it, checked at each sync (500 ms here); every SVID the sidecar holds
has between ~10.5 s and 14 s to live. (At 12 s or less a fresh SVID could be
due at once, and the agent would rotate again and again: spire
pkg/common/rotationutil.) Each test has its own agent, so stopping one
disturbs no other test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import tempfile

from cryptography import x509
from grpc_health.v1 import health_pb2

from spiffe import X509Source

from sidecar.client import AsyncClient, SpiffeMtls
from tests.test_spire_sidecar import (
    SIDECAR_DNS,
    SIDECAR_ID,
    register_sidecar,
    rfc3339,
    seen,
    sidecar_settings,
    tls_target,
    unix_target,
    wait_for,
    wait_health,
)

SHORT_TTL = 14  # seconds: short, yet a fresh SVID is never due at once (see above)


def presented_certificate(target: str, svid) -> x509.Certificate:
    """The certificate the sidecar presents to a new TLS connection (with a SPIRE client SVID)."""
    host, port = target.rsplit(":", 1)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=svid.bundle_pem.decode())
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as directory:
        cert, key = os.path.join(directory, "svid.pem"), os.path.join(directory, "svid.key")
        with open(cert, "wb") as f:
            f.write(svid.chain_pem)
        with open(key, "wb") as f:
            f.write(svid.key_pem)
        context.load_cert_chain(cert, key)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=SIDECAR_DNS) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


async def test_a_short_svid_ttl_rotates_without_a_restart(spire, tmp_path, running_sidecar):
    agent = spire.agent("rotating")
    register_sidecar(agent, x509_ttl=SHORT_TTL)
    planner = agent.workload("planner")
    agent.register("/ns/agents/sa/planner", *planner.selectors, x509_ttl=SHORT_TTL)
    sidecar = await running_sidecar(sidecar_settings(tmp_path, agent))
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)

    async with AsyncClient(unix_target(sidecar)) as client:
        first = seen(await client.authorize("echo", {}))
        assert first["spiffe_id"] == SIDECAR_ID

        async def rotated():
            got = seen(await client.authorize("echo", {}))
            return got if got["svid_expires_at"] > first["svid_expires_at"] else None

        second = await wait_for(rotated, "the sidecar to present a rotated SVID")
    assert second["spiffe_id"] == SIDECAR_ID and second["source"] == "workload_api"

    # New TLS connections get the rotated SVID as the server certificate ...
    client_svid = planner.wait_for_identity()
    served = await asyncio.to_thread(presented_certificate, tls_target(sidecar), client_svid)
    assert rfc3339(served.not_valid_after_utc) >= second["svid_expires_at"]
    assert served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [SIDECAR_ID]

    # ... and the client library follows its own rotation: SpiffeMtls on an
    # X509Source (this process's registration, rotating the same way) opens a
    # new channel with the new SVID.
    source = await asyncio.to_thread(X509Source, socket_path=agent.endpoint, timeout_in_seconds=10)
    try:
        async with AsyncClient(tls_target(sidecar), credentials=SpiffeMtls(source, SIDECAR_DNS)) as client:
            before = seen(await client.authorize("echo", {}))
            assert before["source"] == "mtls"

            async def client_rotated():
                got = seen(await client.authorize("echo", {}))
                return got if got["svid_expires_at"] > before["svid_expires_at"] else None

            after = await wait_for(client_rotated, "the client's SVID to rotate")
    finally:
        source.close()
    assert (after["spiffe_id"], after["source"]) == (SIDECAR_ID, "mtls")


async def test_agent_stopped_denies_once_the_svid_expires_and_serves_again_when_back(
    spire, tmp_path, running_sidecar, caplog
):
    caplog.set_level(logging.INFO, logger="sidecar.identity")
    agent = spire.agent("flaky")
    register_sidecar(agent, x509_ttl=SHORT_TTL)
    sidecar = await running_sidecar(sidecar_settings(tmp_path, agent, sources=["workload_api"]))
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
    async with AsyncClient(unix_target(sidecar)) as client:
        assert (await client.authorize("echo", {})).outcome == "allow"

        agent.stop()  # the held SVID has at least ~10 s left
        held = seen(await client.authorize("echo", {}))
        assert held["spiffe_id"] == SIDECAR_ID

        async def denied():
            result = await client.authorize("echo", {})
            return result if result.outcome == "deny" else None

        refused = await wait_for(denied, "the held SVID to expire")
        assert refused.reasons[0].startswith(
            f"unverified_caller: workload_api: the sidecar's X.509-SVID {SIDECAR_ID} expired at {held['svid_expires_at']}"
        )
        await wait_health(sidecar, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert any("Workload API X.509-SVID stream ended" in r.getMessage() for r in caplog.records)

        agent.start()
        await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
        back = await client.authorize("echo", {})
    assert back.outcome == "allow"
    assert seen(back)["svid_expires_at"] > held["svid_expires_at"]
