"""What a real SPIRE can throw at the sidecar: each is a deny with a reason, never a crash or an allow.

- the agent answers "no identity issued" (no registration for the sidecar);
- the sidecar's registration is deleted while it serves;
- SVIDs from another trust domain (a second SPIRE server, `other.test`),
  also when SPIRE federates that trust domain's bundle to the sidecar but
  the sidecar does not accept it (`identity.trust_domains`).

Each test has its own agent, so registrations can change under it.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2

from sidecar.client import AsyncClient
from tests.infra.spire import X509Svid, own_process_selectors
from tests.test_spire_sidecar import (
    AUD,
    SIDECAR_DNS,
    SIDECAR_ID,
    SIDECAR_PATH,
    TD,
    bearer,
    health,
    mtls_client,
    record_of,
    register_sidecar,
    seen,
    sidecar_settings,
    start_spire,
    unix_target,
    wait_for,
    wait_health,
)

OTHER_TD = "other.test"
STRANGER_ID = f"spiffe://{OTHER_TD}/ns/agents/sa/stranger"


@pytest.fixture(scope="module")
def other(spire):
    """A second SPIRE (trust domain other.test) with a registered workload, `stranger`."""
    server = start_spire(OTHER_TD)
    agent = server.agent("far")
    stranger = agent.workload("stranger")
    agent.register(STRANGER_ID.removeprefix(f"spiffe://{OTHER_TD}"), *stranger.selectors)
    stranger.wait_for_identity()
    yield server, stranger
    server.close()


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


async def denied(client):
    result = await client.authorize("echo", {})
    return result if result.outcome == "deny" else None


async def test_no_identity_issued_is_a_deny_until_spire_registers_the_sidecar(
    spire, tmp_path, running_sidecar, caplog
):
    caplog.set_level(logging.INFO, logger="sidecar.identity")
    agent = spire.agent("bare")  # no registration for this process
    sidecar = await running_sidecar(sidecar_settings(tmp_path, agent))
    detail = await wait_for(
        lambda: _detail_containing(sidecar, "no identity issued"), "the agent to answer no identity issued"
    )
    assert "is this workload registered with SPIRE?" in detail
    async with AsyncClient(unix_target(sidecar)) as client:
        refused = await client.authorize("echo", {})
        assert refused.outcome == "deny"
        assert refused.reasons[0].startswith("unverified_caller: workload_api: ")
        assert "no identity issued (PERMISSION_DENIED)" in refused.reasons[0]
        assert record_of(tmp_path / "evidence", refused)["subject"] is None
        assert "no identity issued (PERMISSION_DENIED)" in messages(caplog)

        register_sidecar(agent)  # the same sidecar, no restart
        await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
        allowed = await client.authorize("echo", {})
    assert allowed.outcome == "allow" and seen(allowed)["spiffe_id"] == SIDECAR_ID


async def _detail_containing(sidecar, text: str) -> str | None:
    status, detail = await health(sidecar)
    return detail if status == health_pb2.HealthCheckResponse.NOT_SERVING and text in detail else None


async def test_a_registration_removed_while_serving_denies_at_once(spire, tmp_path, running_sidecar, caplog):
    caplog.set_level(logging.INFO, logger="sidecar.identity")
    agent = spire.agent("revoked")
    entry = agent.register(SIDECAR_PATH, *own_process_selectors(), dns=(SIDECAR_DNS,))
    sidecar = await running_sidecar(sidecar_settings(tmp_path, agent))
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)
    async with AsyncClient(unix_target(sidecar)) as client:
        held = seen(await client.authorize("echo", {}))
        assert held["spiffe_id"] == SIDECAR_ID

        agent.unregister(entry)
        refused = await wait_for(lambda: denied(client), "the agent to withdraw the SVID")
    # Withdrawn, not kept until its expiry (an hour away).
    assert refused.reasons[0].startswith(
        "unverified_caller: workload_api: the Workload API withdrew the sidecar's identity: no identity issued"
    )
    await wait_health(sidecar, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert "the Workload API withdrew the X.509-SVID" in messages(caplog)
    assert record_of(tmp_path / "evidence", refused)["outcome"] == "deny"


async def test_svids_from_another_trust_domain_are_refused(spire, other, tmp_path, running_sidecar, caplog):
    caplog.set_level(logging.INFO, logger="sidecar.gate")
    other_server, stranger = other
    spire.trust(other_server)  # static federation: SPIRE hands the sidecar other.test's bundles too
    agent = spire.agent("border")
    register_sidecar(agent, federates_with=(OTHER_TD,))
    local = agent.workload("local")
    agent.register("/ns/agents/sa/local", *local.selectors)
    local_svid = local.wait_for_identity()

    sidecar = await running_sidecar(sidecar_settings(tmp_path, agent))  # accepts its own trust domain only
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)

    # A JWT-SVID other.test's SPIRE minted for the sidecar's audience.
    token = stranger.fetch_jwt(AUD)
    async with AsyncClient(unix_target(sidecar), metadata=bearer(token)) as client:
        refused = await client.authorize("echo", {})
    assert refused.outcome == "deny"
    assert refused.reasons[0] == (
        f"unverified_caller: jwt_svid: trust domain {OTHER_TD} is not accepted (accepted: {TD})"
    )
    assert record_of(tmp_path / "evidence", refused)["subject"] is None
    assert f"unverified caller denied (decision {refused.decision_id})" in messages(caplog)
    assert f"trust domain {OTHER_TD} is not accepted" in messages(caplog)

    # An X.509-SVID of other.test: the TLS handshake is refused before any call.
    async with mtls_client(sidecar, stranger.fetch_x509()) as client:
        with pytest.raises(grpc.RpcError) as info:
            await client.authorize("echo", {})
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    # The sidecar keeps serving its own trust domain.
    async with mtls_client(sidecar, local_svid) as client:
        assert (await client.authorize("echo", {})).outcome == "allow"


async def test_a_federated_trust_domain_is_accepted_only_when_configured(spire, other, tmp_path, running_sidecar):
    other_server, stranger = other
    spire.trust(other_server)
    agent = spire.agent("federated")
    register_sidecar(agent, federates_with=(OTHER_TD,))
    sidecar = await running_sidecar(sidecar_settings(tmp_path, agent, trust_domains=[TD, OTHER_TD]))
    await wait_health(sidecar, health_pb2.HealthCheckResponse.SERVING)

    async with AsyncClient(unix_target(sidecar), metadata=bearer(stranger.fetch_jwt(AUD))) as client:
        got = seen(await client.authorize("echo", {}))
    assert (got["spiffe_id"], got["trust_domain"], got["source"]) == (STRANGER_ID, OTHER_TD, "jwt_svid")

    # The X.509 bundle SPIRE federated lets other.test's SVID through mTLS; the
    # client trusts the sidecar through sidecar.test's bundle.
    svid = stranger.fetch_x509()
    own_bundle = spire.bundle_pem().encode()
    async with mtls_client(sidecar, X509Svid(svid.chain_pem, svid.key_pem, own_bundle)) as client:
        got = seen(await client.authorize("echo", {}))
    assert (got["spiffe_id"], got["source"]) == (STRANGER_ID, "mtls")
