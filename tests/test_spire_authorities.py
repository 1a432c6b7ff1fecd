"""SPIRE rotating and revoking its signing keys while the sidecar serves.

`spire-server localauthority jwt|x509 prepare | activate | taint | revoke` is
how an operator replaces a signing key: the prepared key enters the bundle
first, then signs, then the old one is tainted (agents re-issue what it
signed) and removed from the bundle. The sidecar must follow the bundles the
agent streams to it, without a restart: what the new key signed verifies,
what the revoked key signed does not. Own server, so no other test sees the
keys change.
"""

from __future__ import annotations

import base64
import json

import grpc
from grpc_health.v1 import health_pb2

from sidecar.client import AsyncClient
from tests.infra.spire import SpireError, X509Svid
from tests.test_spire_sidecar import (
    AUD,
    PLANNER_ID,
    TD,
    bearer,
    mtls_client,
    register_sidecar,
    seen,
    sidecar_settings,
    unix_target,
    wait_for,
    wait_health,
)


def kid(token: str) -> str:
    header = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"]


def authorities(server, kind: str) -> dict:
    """`spire-server localauthority <kind> show`: {"active": {"authority_id": ...}, "prepared": ..., "old": ...}."""
    return json.loads(server.cli("localauthority", kind, "show", "-output", "json"))


def rotate(server, kind: str) -> tuple[str, str]:
    """Prepare and activate a new authority: (old id, new id)."""
    old = authorities(server, kind)["active"]["authority_id"]
    new = json.loads(server.cli("localauthority", kind, "prepare", "-output", "json"))["prepared_authority"][
        "authority_id"
    ]
    server.cli("localauthority", kind, "activate", "-authorityID", new)
    return old, new


def taint(server, kind: str, authority_id: str) -> None:
    """Mark the old authority tainted: agents re-issue what it signed (their own SVIDs too)."""
    server.cli("localauthority", kind, "taint", "-authorityID", authority_id)


def revoke(server, kind: str, authority_id: str) -> None:
    """Remove a tainted authority from the bundle."""
    server.cli("localauthority", kind, "revoke", "-authorityID", authority_id)


async def test_a_new_jwt_key_is_trusted_and_a_revoked_one_refused_without_a_restart(spire, tmp_path, running_sidecar):
    agent = spire.agent("keys")
    register_sidecar(agent)
    planner = agent.workload("planner")
    agent.register(PLANNER_ID.removeprefix(f"spiffe://{TD}"), *planner.selectors)
    planner.wait_for_identity()
    sidecar = await running_sidecar(sidecar_settings(tmp_path, agent))
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)

    old_token = planner.fetch_jwt(AUD)

    async def outcome(token: str) -> str:
        async with AsyncClient(unix_target(sidecar), metadata=bearer(token)) as client:
            result = await client.authorize("echo", {})
        return result.outcome if result.outcome == "allow" else result.reasons[0]

    assert await outcome(old_token) == "allow"

    old_kid, new_kid = rotate(spire, "jwt")
    assert kid(old_token) == old_kid

    # A workload registered now has no cached token: SPIRE signs its first with the active key.
    newcomer = agent.workload("newcomer")
    agent.register("/ns/agents/sa/newcomer", *newcomer.selectors)
    newcomer.wait_for_identity()
    new_token = newcomer.fetch_jwt(AUD)
    assert kid(new_token) == new_kid
    assert await wait_for(lambda: _allowed(outcome, new_token), "the sidecar to trust the new key") == "allow"
    assert await outcome(old_token) == "allow"  # the old key is still in the bundle

    taint(spire, "jwt", old_kid)
    revoke(spire, "jwt", old_kid)
    refused = await wait_for(lambda: _refused(outcome, old_token), "the revoked key to leave the sidecar's bundle")
    assert refused == f"unverified_caller: jwt_svid: unknown kid {old_kid!r} for trust domain {TD}"
    assert await outcome(new_token) == "allow"


async def test_a_revoked_x509_authority_is_no_longer_trusted_and_the_sidecar_moves_to_the_new_one(
    spire, tmp_path, running_sidecar
):
    agent = spire.agent("ca")
    register_sidecar(agent)
    planner = agent.workload("planner")
    agent.register(PLANNER_ID.removeprefix(f"spiffe://{TD}"), *planner.selectors)
    old_svid = planner.wait_for_identity()
    sidecar = await running_sidecar(sidecar_settings(tmp_path, agent, sources=["mtls", "workload_api"]))
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
    async with mtls_client(sidecar, old_svid) as client:
        assert seen(await client.authorize("echo", {}))["spiffe_id"] == PLANNER_ID

    agent_serial = agent.svid_serial()
    old_ca, _ = rotate(spire, "x509")
    taint(spire, "x509", old_ca)

    async def reissued():
        try:
            svid = planner.fetch_x509()
        except SpireError:  # for a moment the agent may hold a bundle and an SVID that disagree
            return None
        return svid if svid.chain_pem != old_svid.chain_pem else None

    new_svid = await wait_for(reissued, "the planner's SVID from the new CA")
    # Revoke only once the agents moved on: an agent whose own SVID the revoked
    # CA signed could no longer reach the server (operators do the same).
    await wait_for(lambda: _changed(agent.svid_serial, agent_serial), "the agent's own SVID to rotate")
    revoke(spire, "x509", old_ca)

    current_bundle = spire.bundle_pem().encode()  # the new CA only
    assert current_bundle != new_svid.bundle_pem

    async def new_accepted():
        # Trusting only the new CA: the handshake succeeds once the sidecar presents its re-issued SVID.
        async with mtls_client(sidecar, X509Svid(new_svid.chain_pem, new_svid.key_pem, current_bundle)) as client:
            try:
                return seen(await client.authorize("echo", {}))["spiffe_id"]
            except grpc.RpcError:
                return None

    assert await wait_for(new_accepted, "the sidecar to present an SVID of the new CA") == PLANNER_ID

    async def old_refused():
        # Same server check as above; the client presents the planner's SVID of the revoked CA.
        async with mtls_client(sidecar, X509Svid(old_svid.chain_pem, old_svid.key_pem, current_bundle)) as client:
            try:
                await client.authorize("echo", {})
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE
        return False

    assert await wait_for(old_refused, "the sidecar to stop trusting the revoked CA")


async def _changed(read, before) -> bool:
    return read() != before


async def _allowed(outcome, token: str):
    return "allow" if await outcome(token) == "allow" else None


async def _refused(outcome, token: str):
    result = await outcome(token)
    return result if result != "allow" else None
