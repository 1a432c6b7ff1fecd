"""Credentials the agent never holds: a JWT-SVID for the upstream's audience from the Workload API
(cached until shortly before expiry), or a secret file; attached by the sidecar, recorded by kind
and id, never by value.

The Workload API here is tests/doubles/fake_workload_api.py (it issues real ES256 JWT-SVIDs);
tests/test_spire_upstream_credentials.py runs the same paths against a real SPIRE server and agent."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import jwt
import pytest
from aiohttp import web
from mcp.client.client import Client

from sidecar.config import ConfigError, load_config
from sidecar.evidence.verify import verify_dir
from sidecar.invoke.credentials import CredentialError, JwtSvidCredential, SecretFileCredential
from sidecar.v1 import sidecar_pb2
from tests.conftest import write_policy
from tests.doubles.fake_workload_api import FakeWorkloadApi
from tests.doubles.identity_harness import remove_dir, short_dir
from tests.infra.http import serve_app
from tests.infra.invoke import invoke, records
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


async def test_gateway_attaches_a_jwt_svid_the_agent_never_sees(gateway_config, running_sidecar,
                                                                workload_api):
    seen = Seen()
    upstream = await serve_http(docs_server(seen))
    try:
        config = gateway_config(POLICY, {"docs": {"url": upstream.url, "credential": {"kind": "jwt_svid", "audience": "docs"}}},
                                **{"identity.workload_api_socket": workload_api.endpoint})
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


async def test_the_agents_own_authorization_header_is_not_forwarded(gateway_config, running_sidecar):
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    seen = Seen()
    upstream = await serve_http(docs_server(seen))
    try:
        config = gateway_config(POLICY, {"docs": {"url": upstream.url}})
        sidecar = await running_sidecar(config)
        http = httpx2.AsyncClient(headers={"authorization": "Bearer agent-held-token"})
        async with Client(streamable_http_client(sidecar.mcp.url, http_client=http)) as agent:
            result = await agent.call_tool("docs__whoami", {})
        assert result.content[0].text == "no credential"
        assert seen.authorization == [""]
    finally:
        await upstream.stop()


# ---------------------------------------------------------------- invoke.jwt_fetch_timeout_seconds
async def test_a_hung_workload_api_fails_closed_after_the_configured_fetch_timeout(workload_api):
    """The fetch's deadline is fetch_timeout_seconds, not a fixed 5 s; the next call asks again."""
    credential = JwtSvidCredential("docs", socket=workload_api.endpoint, fetch_timeout_seconds=0.5)
    workload_api.hang()
    started = time.monotonic()
    with pytest.raises(CredentialError) as info:
        await credential.header()
    took = time.monotonic() - started
    assert info.value.reason == (
        "credential_unavailable: no JWT-SVID for audience 'docs' from the Workload API: "
        "no answer within 0.5 s (invoke.jwt_fetch_timeout_seconds; DEADLINE_EXCEEDED)"
    )
    assert workload_api.calls.count("FetchJWTSVID") == 1  # it asked, and the agent did not answer
    assert 0.4 < took < 4.0, took  # the configured 0.5 s, well under the old fixed 5 s

    workload_api.hang(False)
    _, value, _ = await credential.header()
    assert claims(value, workload_api, "docs")["sub"] == SIDECAR_ID


async def test_callers_of_one_audience_share_one_fetch_and_its_outcome(workload_api):
    """docs/mcp.md#credentials: callers that need a token at once share one fetch. Behind a hung agent
    all are refused by that one fetch's timeout (not one timeout per caller queued before them); one
    caller giving up does not stop the fetch for the others; the next caller after it asks again."""
    credential = JwtSvidCredential("docs", socket=workload_api.endpoint, fetch_timeout_seconds=0.3)
    workload_api.hang()
    impatient = asyncio.create_task(credential.header())
    waiting = [asyncio.create_task(credential.header()) for _ in range(5)]
    await asyncio.sleep(0.05)
    impatient.cancel()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, CredentialError) and "no answer within 0.3 s" in o.reason for o in outcomes), outcomes
    assert workload_api.calls.count("FetchJWTSVID") == 1  # one fetch for six callers

    workload_api.hang(False)
    values = await asyncio.gather(*(credential.header() for _ in range(5)))
    assert workload_api.calls.count("FetchJWTSVID") == 2 and len({value for _, value, _ in values}) == 1
    assert claims(values[0][1], workload_api, "docs")["sub"] == SIDECAR_ID


@pytest.mark.parametrize("value", [0, -1, 0.0, float("nan"), float("inf")])
def test_a_fetch_timeout_that_is_not_a_positive_number_is_refused_by_the_credential(value):
    with pytest.raises(ValueError):
        JwtSvidCredential("docs", fetch_timeout_seconds=value)


def test_the_fetch_timeout_defaults_to_5_s_and_takes_a_number_of_seconds(tmp_path):
    assert load_config(None, {}, runs_sidecar=False).invoke.jwt_fetch_timeout_seconds == 5.0
    path = tmp_path / "sidecar.yaml"
    path.write_text("invoke:\n  jwt_fetch_timeout_seconds: 0.5\n")
    assert load_config(path, runs_sidecar=False).invoke.jwt_fetch_timeout_seconds == 0.5
    assert load_config(None, {"invoke.jwt_fetch_timeout_seconds": 2}, runs_sidecar=False
                       ).invoke.jwt_fetch_timeout_seconds == 2.0


@pytest.mark.parametrize("text", ["0", "-1", ".nan", ".inf", "'5s'", "true", "null", "[5]"])
def test_a_bad_fetch_timeout_is_refused_at_load_naming_the_key(tmp_path, text):
    path = tmp_path / "sidecar.yaml"
    path.write_text(f"invoke:\n  jwt_fetch_timeout_seconds: {text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, runs_sidecar=False)
    assert str(info.value).startswith("invoke.jwt_fetch_timeout_seconds: "), str(info.value)


INVOKE_POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok: tickets"], "obligations": {}} if {
        input.tool.name in {"create_ticket", "close_ticket"}
    }
"""


async def test_invoke_with_a_hung_workload_api_is_not_called_after_the_configured_timeout(
        tmp_path, sidecar_config, running_sidecar, workload_api):
    """Through the sidecar: invoke.jwt_fetch_timeout_seconds reaches the credential (server.py), and a
    hung agent makes Invoke answer not_called with the reason, recorded, and no request goes out."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("authorization", ""))
        return web.json_response({"ok": True}, status=201)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    async with serve_app(app) as base:
        config = sidecar_config(**{
            "policy.dir": str(write_policy(tmp_path / "policy", INVOKE_POLICY)),
            "listen.unix": "",
            "identity.workload_api_socket": workload_api.endpoint,
            "invoke.jwt_fetch_timeout_seconds": 0.5,
            "invoke.tools": {
                "create_ticket": {"url": base + "/create", "credential": {"kind": "jwt_svid", "audience": "tickets"}},
                "close_ticket": {"url": base + "/close", "credential": {"kind": "jwt_svid", "audience": "closer"}},
            },
        })
        sidecar = await running_sidecar(config)
        address = sidecar.addresses[0]
        assert (await invoke(address, "create_ticket", {"title": "a"})).status == "ok"
        assert len(seen) == 1

        workload_api.hang()  # close_ticket's audience has no cached token: it must be fetched
        started = time.monotonic()
        response = await invoke(address, "close_ticket", {"id": 1})
        took = time.monotonic() - started
        assert response.decision.outcome == sidecar_pb2.OUTCOME_ALLOW
        assert (response.status, response.upstream_status) == ("not_called", 0), response
        assert response.error == (
            "credential_unavailable: no JWT-SVID for audience 'closer' from the Workload API: "
            "no answer within 0.5 s (invoke.jwt_fetch_timeout_seconds; DEADLINE_EXCEEDED)"
        )
        assert took < 4.0, took  # the configured 0.5 s, well under the old fixed 5 s
        assert len(seen) == 1  # no request went out, with or without a credential
        invocation = records(config.evidence.dir)[-1]
        assert (invocation["kind"], invocation["tool"], invocation["status"]) == ("invocation", "close_ticket",
                                                                                   "not_called")
        # The record says what the agent was told, word for word: the sidecar's own reason code is not a secret key.
        assert invocation["reasons"] == [response.error] and "redacted" not in invocation
        assert invocation["credential_kind"] == ""

        workload_api.hang(False)  # the agent back: the next call fetches and is made
        assert (await invoke(address, "close_ticket", {"id": 1})).status == "ok"
        assert claims(seen[-1], workload_api, "closer")["sub"] == SIDECAR_ID
    assert verify_dir(Path(config.evidence.dir)).ok
