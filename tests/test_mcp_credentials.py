"""Credentials the agent never holds: a JWT-SVID for the upstream's audience from the Workload API
(cached until shortly before expiry), or a secret file; attached by the sidecar, recorded by kind
and id, never by value.

The Workload API here is tests/doubles/fake_workload_api.py (it issues real ES256 JWT-SVIDs);
tests/test_spire_upstream_credentials.py runs the same paths against a real SPIRE server and agent."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
from mcp.client.client import Client

from sidecar.evidence.verify import verify_dir
from sidecar.invoke.credentials import CredentialError, JwtSvidCredential, SecretFileCredential
from tests.conftest import write_policy
from tests.doubles.fake_workload_api import FakeWorkloadApi
from tests.doubles.identity_harness import remove_dir, short_dir
from tests.mcp_upstreams import Seen, docs_server, serve_http
from tests.test_mcp_gateway import POLICY, evidence

SIDECAR_ID = "spiffe://example.org/ns/agents/sa/sidecar"


@pytest.fixture
def workload_api():
    directory = short_dir()
    api = FakeWorkloadApi(f"{directory}/agent.sock").start()
    api.set_identity("/ns/agents/sa/sidecar")
    yield api
    api.stop()
    remove_dir(directory)


def claims(header_value: str, api: FakeWorkloadApi, audience: str) -> dict:
    scheme, token = header_value.split(" ", 1)
    assert scheme == "Bearer"
    return jwt.decode(token, api.jwt_authority.key.public_key(), algorithms=["ES256"], audience=audience)


async def test_jwt_svid_for_the_audience_is_cached_until_shortly_before_expiry(workload_api):
    now = [0.0]
    credential = JwtSvidCredential("docs", socket=workload_api.endpoint, refresh_before_seconds=30,
                                   clock=lambda: now[0])
    now[0] = time.time()
    name, value, use = await credential.header()
    assert name == "authorization"
    assert claims(value, workload_api, "docs")["sub"] == SIDECAR_ID
    assert use.kind == "jwt_svid" and use.id == f"{SIDECAR_ID} aud=docs" and value.split()[1] not in use.id
    fetched = workload_api.calls.count("FetchJWTSVID")
    assert (await credential.header())[1] == value  # cached
    assert workload_api.calls.count("FetchJWTSVID") == fetched
    expiry = claims(value, workload_api, "docs")["exp"]
    now[0] = expiry - 29  # inside the refresh margin: a new one
    await credential.header()
    assert workload_api.calls.count("FetchJWTSVID") == fetched + 1


async def test_no_workload_api_means_no_credential_and_no_call(tmp_path):
    credential = JwtSvidCredential("docs", socket=f"unix://{tmp_path}/missing.sock")
    with pytest.raises(CredentialError) as info:
        await credential.header()
    assert info.value.reason.startswith("credential_unavailable:")


@pytest.mark.parametrize("content, problem", [(None, "cannot be read"), (b"  \n", "empty"),
                                              (b"a\nb", "several lines"), (b"\xff\xfe", "not ASCII")])
async def test_bad_secret_files_are_refused(tmp_path, content, problem):
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CredentialError) as info:
        await SecretFileCredential(str(path)).header()
    assert problem in info.value.reason


async def test_a_rotated_secret_file_is_used_at_once_and_its_id_changes(tmp_path):
    path = tmp_path / "secret"
    path.write_text("one\n")
    credential = SecretFileCredential(str(path))
    _, first, first_use = await credential.header()
    path.write_text("two")
    _, second, second_use = await credential.header()
    assert (first, second) == ("Bearer one", "Bearer two")
    assert first_use.id != second_use.id and "one" not in first_use.id


async def test_gateway_attaches_a_jwt_svid_the_agent_never_sees(tmp_path, sidecar_config, running_sidecar,
                                                                workload_api):
    seen = Seen()
    upstream = await serve_http(docs_server(seen))
    try:
        config = sidecar_config(**{
            "policy.dir": str(write_policy(tmp_path / "policy", POLICY)),
            "listen.unix": "",
            "identity.workload_api_socket": workload_api.endpoint,
            "mcp.listen": "127.0.0.1:0",
            "mcp.upstreams": {"docs": {"url": upstream.url, "credential": {"kind": "jwt_svid", "audience": "docs"}}},
        })
        sidecar = await running_sidecar(config)
        async with Client(sidecar.mcp.url) as agent:
            result = await agent.call_tool("docs__search", {"query": "q"})
        assert not result.is_error, result
        token = seen.authorization[-1]
        assert claims(token, workload_api, "docs")["sub"] == SIDECAR_ID
        assert token.split()[1] not in result.model_dump_json()
        log = evidence(Path(config.evidence.dir))
        assert token.split()[1] not in json.dumps(log)
        invocation = next(r for r in log if r["kind"] == "invocation")
        assert (invocation["credential_kind"], invocation["credential_id"]) == ("jwt_svid", f"{SIDECAR_ID} aud=docs")
        assert verify_dir(Path(config.evidence.dir)).ok
    finally:
        await upstream.stop()


async def test_the_agents_own_authorization_header_is_not_forwarded(tmp_path, sidecar_config, running_sidecar):
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    seen = Seen()
    upstream = await serve_http(docs_server(seen))
    try:
        config = sidecar_config(**{
            "policy.dir": str(write_policy(tmp_path / "policy", POLICY)),
            "listen.unix": "",
            "mcp.listen": "127.0.0.1:0",
            "mcp.upstreams": {"docs": {"url": upstream.url}},
        })
        sidecar = await running_sidecar(config)
        http = httpx2.AsyncClient(headers={"authorization": "Bearer agent-held-token"})
        async with Client(streamable_http_client(sidecar.mcp.url, http_client=http)) as agent:
            result = await agent.call_tool("docs__whoami", {})
        assert result.content[0].text == "no credential"
        assert seen.authorization == [""]
    finally:
        await upstream.stop()
