"""WorkloadApiSource against the fake Workload API: what the real SPIRE cannot be made to do.

Startup before the agent, "no identity issued", rotation, withdrawal, the
agent going away and coming back, expiry, federated bundles and JWT key
rotation are tested against the real SPIRE agent (tests/test_spire_*.py).
What stays here needs the test double (tests/doubles/fake_workload_api.py):
an agent that hangs, X.509-SVIDs without JWT bundles, SVIDs that arrive
expired or with a malformed ID, plus the source's own mechanics (endpoint
parsing, unix only, a prompt close).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time

import grpc
import pytest
from spiffe._proto import workload_pb2, workload_pb2_grpc

from sidecar.identity import IdentityError, PeerInfo
from sidecar.identity.workload_api import (
    ENDPOINT_ENV,
    WorkloadApiResolver,
    WorkloadApiSource,
    resolve_endpoint,
)
from tests.doubles.fake_workload_api import FakeWorkloadApi
from tests.doubles.identity_harness import fake_agent, remove_dir, short_dir

AGENT_ID = "spiffe://example.org/ns/agents/sa/agent"
UNIX = PeerInfo(transport="unix")


def wait_for(predicate, timeout: float = 30.0) -> bool:  # as soon as it holds; room for a loaded machine
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
        # the SVID was offered and refused (not: 0.3 s passed, which a loaded machine may not reach)
        assert wait_for(lambda: "last attempt:" in source.health()[1]), source.health()
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
