"""The sidecar's own SVID from the Workload API: startup, rotation, withdrawal, outages.

The agent is the fake Workload API in tests/doubles (no SPIRE binary can be
installed here); it speaks the real protocol over a unix socket and py-spiffe
talks to it as it would to SPIRE.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time

import grpc
import pytest
from spiffe._proto import workload_pb2, workload_pb2_grpc

from sidecar.identity import IdentityError, PeerInfo
from sidecar.identity.workload_api import (
    ENDPOINT_ENV,
    SvidUnavailable,
    WorkloadApiResolver,
    WorkloadApiSource,
    resolve_endpoint,
)
from tests.doubles.fake_workload_api import FakeWorkloadApi
from tests.doubles.identity_harness import fake_agent, remove_dir, short_dir
from tests.doubles.pki import TestCa

AGENT_ID = "spiffe://example.org/ns/agents/sa/agent"
UNIX = PeerInfo(transport="unix")


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def sockdir():
    d = short_dir()
    yield d
    remove_dir(d)


@pytest.fixture
def sources():
    made: list[WorkloadApiSource] = []

    def make(endpoint: str, **kwargs) -> WorkloadApiSource:
        kwargs.setdefault("answer_timeout", 1.0)
        kwargs.setdefault("backoff_initial", 0.02)
        kwargs.setdefault("backoff_max", 0.1)
        source = WorkloadApiSource(endpoint, **kwargs).start()
        made.append(source)
        return source

    yield make
    for source in made:
        source.close()


@pytest.fixture
def agent(sockdir):
    api = fake_agent(sockdir)
    yield api
    api.stop()


def reason_of(resolver: WorkloadApiResolver) -> str:
    with pytest.raises(IdentityError) as info:
        resolver.resolve(UNIX)
    return info.value.reason


# ---------------------------------------------------------------- the test double itself


def test_fake_agent_speaks_like_spire(agent):
    channel = grpc.insecure_channel(f"unix:{agent.socket_path}")
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), timeout=2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "security header missing" in info.value.details()
    header = [("workload.spiffe.io", "true")]
    reply = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), timeout=2, metadata=header)
    assert reply.svids[0].spiffe_id == AGENT_ID
    agent.withdraw()
    with pytest.raises(grpc.RpcError) as info:
        next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=2, metadata=header))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "no identity issued"
    channel.close()


# ---------------------------------------------------------------- startup


def test_startup_before_the_agent_socket_exists(sockdir, sources, caplog):
    caplog.set_level(logging.INFO, logger="sidecar.identity")
    api = FakeWorkloadApi(os.path.join(sockdir, "agent.sock"))
    source = sources(api.endpoint)
    resolver = WorkloadApiResolver(source)
    assert wait_for(lambda: "does not exist yet" in source.health()[1])
    serving, detail = resolver.health()
    assert not serving
    assert "does not exist yet" in reason_of(resolver)
    assert wait_for(lambda: any("does not exist yet; retrying in" in r.getMessage() for r in caplog.records))

    api.start()  # the agent comes up, but has no identity for us yet
    try:
        assert wait_for(lambda: "no identity issued" in source.health()[1])
        assert not resolver.health()[0]
        assert "no identity issued" in reason_of(resolver)

        svid = api.set_identity("/ns/agents/sa/agent")[0]
        api.publish_jwt_bundles()
        assert source.wait_until_ready(5)
        identity = resolver.resolve(UNIX)
        assert identity.subject.spiffe_id == AGENT_ID
        assert identity.subject.source == "workload_api"
        assert identity.subject.svid_expires_at == svid.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert resolver.health() == (True, f"SVID {AGENT_ID} valid until {identity.subject.svid_expires_at}")
    finally:
        api.stop()


def test_not_ready_until_jwt_bundles_arrive_when_watched(sockdir, sources):
    api = FakeWorkloadApi(os.path.join(sockdir, "agent.sock")).start()
    try:
        api.set_identity("/agent")
        source = sources(api.endpoint)
        assert wait_for(lambda: source.trust_domain() == "example.org")
        assert not source.health()[0]
        assert "JWT bundles" in source.health()[1]
        api.publish_jwt_bundles()
        assert source.wait_until_ready(5)
        # X.509 only: ready without JWT bundles
        x509_only = sources(api.endpoint, jwt_bundles=False)
        assert x509_only.wait_until_ready(5)
    finally:
        api.stop()


def test_hanging_agent_is_abandoned_and_retried(sockdir, sources):
    api = FakeWorkloadApi(os.path.join(sockdir, "agent.sock")).start()
    try:
        api.set_identity("/agent")
        api.publish_jwt_bundles()
        api.hang()
        source = sources(api.endpoint, answer_timeout=0.3)
        assert wait_for(lambda: "no answer within 0.3s" in source.health()[1])
        assert not source.health()[0]
        api.hang(False)
        assert source.wait_until_ready(5)
    finally:
        api.stop()


def test_endpoint_configuration(monkeypatch):
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    with pytest.raises(ValueError, match="SPIFFE_ENDPOINT_SOCKET"):
        resolve_endpoint("")
    for bad in ("/run/agent.sock", "unix:run/agent.sock", "tcp://127.0.0.1:8081", "unix://relative"):
        with pytest.raises(ValueError, match="unix:///absolute/path"):
            resolve_endpoint(bad)
    monkeypatch.setenv(ENDPOINT_ENV, "unix:///run/spire/agent.sock")
    assert resolve_endpoint("") == "unix:///run/spire/agent.sock"
    assert resolve_endpoint("unix:///other.sock") == "unix:///other.sock"


# ---------------------------------------------------------------- while running


def test_rotation_is_picked_up_without_restart(agent, sources):
    source = sources(agent.endpoint)
    assert source.wait_until_ready(5)
    seen = []
    source.subscribe(lambda held: seen.append(held.serial))
    first = source.x509().serial
    new = agent.rotate(ttl=7200)[0]
    assert wait_for(lambda: source.x509().serial == new.serial)
    assert new.serial != first and new.serial in seen
    expires = WorkloadApiResolver(source).resolve(UNIX).subject.svid_expires_at
    assert expires == new.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_jwt_bundle_rotation(agent, sources):
    source = sources(agent.endpoint)
    assert source.wait_until_ready(5)
    old_kid = agent.jwt_authority.kid
    assert old_kid in source.jwt_keys("example.org")
    new = agent.rotate_jwt_key()
    assert wait_for(lambda: new.kid in (source.jwt_keys("example.org") or {}))
    assert old_kid not in source.jwt_keys("example.org")
    assert source.jwt_keys("other.org") is None


def test_withdrawn_identity_is_dropped_at_once(agent, sources, caplog):
    caplog.set_level(logging.WARNING, logger="sidecar.identity")
    source = sources(agent.endpoint)
    resolver = WorkloadApiResolver(source)
    assert source.wait_until_ready(5)
    assert resolver.resolve(UNIX).subject.spiffe_id == AGENT_ID
    agent.withdraw()  # registration entry deleted: SPIRE answers PERMISSION_DENIED
    assert wait_for(lambda: not source.health()[0])
    reason = reason_of(resolver)
    assert "withdrew" in reason and "no identity issued" in reason
    assert wait_for(lambda: any("withdrew" in r.getMessage() for r in caplog.records))
    agent.set_identity("/ns/agents/sa/agent")
    assert source.wait_until_ready(5)
    assert resolver.resolve(UNIX).subject.spiffe_id == AGENT_ID


def test_agent_restarting_mid_stream(agent, sources):
    source = sources(agent.endpoint)
    resolver = WorkloadApiResolver(source)
    assert source.wait_until_ready(5)
    before = source.x509().serial
    agent.stop()  # the socket disappears; the held SVID is still valid and still used
    time.sleep(0.3)
    assert resolver.resolve(UNIX).subject.spiffe_id == AGENT_ID
    assert source.health()[0]
    agent.start()
    rotated = agent.rotate()[0]
    assert wait_for(lambda: source.x509().serial == rotated.serial)
    assert rotated.serial != before


def test_expired_svid_is_never_used(agent, sources):
    now = [dt.datetime.now(dt.timezone.utc)]
    source = sources(agent.endpoint, clock=lambda: now[0])
    resolver = WorkloadApiResolver(source)
    assert source.wait_until_ready(5)
    held = source.x509()
    agent.stop()  # no rotation can come
    now[0] = held.expires_at + dt.timedelta(seconds=1)
    reason = reason_of(resolver)
    assert f"expired at {held.expires_at.strftime('%Y-%m-%dT%H:%M:%SZ')}" in reason
    assert "waiting for a fresh one" in reason
    assert not resolver.health()[0]
    with pytest.raises(SvidUnavailable):
        source.x509()
    # The agent comes back with a fresh SVID: calls go through again.
    agent.start()
    agent.set_identity("/ns/agents/sa/agent", ttl=3 * 3600)
    assert wait_for(lambda: source.health()[0], 10)
    assert resolver.resolve(UNIX).subject.spiffe_id == AGENT_ID


def test_svid_that_arrives_expired_is_not_used(sockdir, sources):
    api = FakeWorkloadApi(os.path.join(sockdir, "agent.sock")).start()
    try:
        ca = api.ca
        stale = ca.issue("/agent", ttl=-5, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))
        api.set_svids([stale])
        api.publish_jwt_bundles()
        source = sources(api.endpoint)
        assert wait_for(lambda: "expired at" in source.health()[1])
        assert not source.health()[0]
    finally:
        api.stop()


def test_svid_with_upper_case_id_is_refused(sockdir, sources):
    api = FakeWorkloadApi(os.path.join(sockdir, "agent.sock")).start()
    try:
        api.set_svids([api.ca.issue(uris=["spiffe://example.org/Agent", "spiffe://example.org/b"])])
        api.publish_jwt_bundles()
        source = sources(api.endpoint)
        time.sleep(0.3)
        assert source.trust_domain() is None  # py-spiffe parses it; we do not hold it
        assert not source.health()[0]
    finally:
        api.stop()


def test_unix_only(agent, sources):
    source = sources(agent.endpoint)
    assert source.wait_until_ready(5)
    resolver = WorkloadApiResolver(source)
    for transport in ("tcp", "tls"):
        with pytest.raises(IdentityError, match=f"this call came over {transport}"):
            resolver.resolve(PeerInfo(transport=transport))


def test_close_is_prompt_and_stops_threads(agent):
    source = WorkloadApiSource(agent.endpoint, backoff_initial=0.02, backoff_max=0.1).start()
    assert source.wait_until_ready(5)
    started = time.monotonic()
    source.close()
    assert time.monotonic() - started < 2
    assert not [t for t in threading.enumerate() if t.name.startswith("workload-api-") and t.is_alive()]


def test_federated_bundles_are_held(agent, sources):
    other = TestCa("partner.example")
    agent.federate_with("partner.example", ca=other)
    source = sources(agent.endpoint)
    assert wait_for(lambda: "partner.example" in source.x509().bundles if source.health()[0] else False)
    assert other.cert in source.x509().bundles["partner.example"]
