"""Upstream credentials against a real SPIRE server and agent (tests/infra/spire.py).

The sidecar (this Python process, registered at pod level with a short
JWT-SVID TTL) forwards allowed calls to two upstreams, attaching a JWT-SVID
that SPIRE minted for the sidecar, for that upstream's audience only:

- `vault`: a real MCP server built with the SDK, over Streamable HTTP
  (audience VAULT_AUD, a SPIFFE ID);
- `create_ticket`: an HTTP tool called through `ToolGate.Invoke`
  (audience TICKETS_AUD, a URL).

Each upstream checks every HTTP request it receives the way a real one
would, with py-spiffe against the JWT bundle it fetched from SPIRE itself
(`spire-server bundle show -format spiffe`): signature, expiry, `aud`
exactly its own audience and `sub` the sidecar's SPIFFE ID. Anything else is
answered 401 and counted, so "no call without a credential reaches the
upstream" is what the upstream saw, not what the sidecar says it sent.

The caller is the `planner` workload, authenticating to the sidecar with its
own SPIRE JWT-SVID (`identity.sources: [jwt_svid]`): that token must never
reach an upstream. How often the sidecar asked the Workload API for a
JWT-SVID is SPIRE's own count (the agent's DEBUG log line per FetchJWTSVID).
Each test has its own agent, so stopping one disturbs no other test.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import grpc
import httpx2
import pytest
import uvicorn
from aiohttp import web
from google.protobuf.struct_pb2 import Struct
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from spiffe import JwtBundle, JwtSvid, TrustDomain, WorkloadApiClient
from starlette.responses import PlainTextResponse

from sidecar.config import Config, load_config
from sidecar.evidence.verify import verify_dir
from sidecar.server import RunningSidecar
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import write_policy
from tests.infra.spire import SpireAgent, SpireServer, own_process_selectors
from tests.test_spire_sidecar import SIDECAR_DNS, SIDECAR_ID, SIDECAR_PATH, TD

PLANNER_PATH = "/ns/agents/sa/planner"
PLANNER_ID = f"spiffe://{TD}{PLANNER_PATH}"
VAULT_AUD = f"spiffe://{TD}/ns/tools/sa/vault"
TICKETS_AUD = "https://tickets.example.org"
JWT_TTL = 10  # seconds: the sidecar's registration entry (-jwtSVIDTTL); the tests wait most of it
AGENTS = itertools.count(1)  # one agent per test: stopping it disturbs no other test
# invoke.jwt_refresh_before_seconds: below 0.4 * JWT_TTL, so this margin (not the share of the lifetime,
# sidecar/invoke/credentials.py) sets when the sidecar renews, and at REFRESH - 0.5 s left SPIRE's agent
# (past a jittered half, 45-55 %, of the lifetime) mints a new one; 7 s of reuse before that.
REFRESH = 3

POLICY = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok: vault"], "obligations": {}} if {
        input.tool.server == "vault"
        input.tool.name == "read_secret"
    }

    decision := {"outcome": "allow", "reasons": ["ok: tickets"], "obligations": {}} if {
        input.tool.name == "create_ticket"
    }
"""


# ---------------------------------------------------------------- what an upstream checks
def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@dataclass
class BearerCheck:
    """One upstream's check of `authorization: Bearer <JWT-SVID>`, against SPIRE's own JWT bundle.

    `accepted`: the tokens of requests let through, in order; `refused`: why
    the others were answered 401; `headers`: every request's headers (to look
    for the agent's token); `tool_tokens`: the token each tool call ran with.
    """

    server: SpireServer
    audience: str
    subject: str = SIDECAR_ID
    accepted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    tool_tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # SPIRE's SPIFFE bundle holds the X.509 authorities too (no kid): keep the JWT ones.
        document = json.loads(self.server.bundle_spiffe())
        keys = [key for key in document["keys"] if key.get("use") == "jwt-svid"]
        assert keys, document
        self.bundle = JwtBundle.parse(TrustDomain(self.server.trust_domain), json.dumps({"keys": keys}).encode())

    def check(self, headers: dict[str, str]) -> str:
        """"" when the request may go on, else why not (and it is counted in `refused`)."""
        self.headers.append(headers)
        scheme, _, token = headers.get("authorization", "").partition(" ")
        try:
            if scheme != "Bearer" or not token:
                raise ValueError("no bearer token")
            svid = JwtSvid.parse_and_validate(token, self.bundle, {self.audience})
            if svid.audience != {self.audience}:
                raise ValueError(f"aud is {sorted(svid.audience)}, not only {self.audience}")
            if str(svid.spiffe_id) != self.subject:
                raise ValueError(f"sub is {svid.spiffe_id}, not the sidecar ({self.subject})")
        except Exception as exc:  # py-spiffe raises several kinds: each one is a refusal
            self.refused.append(f"{type(exc).__name__}: {exc}")
            return self.refused[-1]
        self.accepted.append(token)
        return ""


# ---------------------------------------------------------------- the upstreams
class BearerGuard:
    """ASGI middleware in front of the MCP server: 401 unless BearerCheck accepts the request."""

    def __init__(self, app, check: BearerCheck):
        self.app, self.check = app, check

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            problem = self.check.check(headers)
            if problem:
                await PlainTextResponse(problem, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def vault_server(check: BearerCheck) -> MCPServer:
    srv = MCPServer("vault")

    @srv.tool()
    def read_secret(name: str, ctx: Context) -> str:
        """Read a secret (the tool records the token its request carried)."""
        check.tool_tokens.append(ctx.request_context.request.headers["authorization"].split(" ", 1)[1])
        return f"secret {name}: s3cr3t"

    return srv


@dataclass
class Served:
    url: str
    stop: Callable[[], Awaitable[None]]


async def serve_vault(check: BearerCheck) -> Served:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    app = BearerGuard(vault_server(check).streamable_http_app(), check)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        await task

    return Served(f"http://127.0.0.1:{sock.getsockname()[1]}/mcp", stop)


async def serve_tickets(check: BearerCheck) -> Served:
    async def create(request: web.Request) -> web.Response:
        problem = check.check({k.lower(): v for k, v in request.headers.items()})
        if problem:
            return web.Response(status=401, text=problem)
        check.tool_tokens.append(request.headers["authorization"].split(" ", 1)[1])
        body = await request.json()
        return web.json_response({"id": len(check.tool_tokens), "title": body.get("title")}, status=201)

    app = web.Application()
    app.router.add_post("/tickets", create)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return Served(f"http://127.0.0.1:{runner.addresses[0][1]}", runner.cleanup)


# ---------------------------------------------------------------- the world
@dataclass
class World:
    agent: SpireAgent
    sidecar: RunningSidecar
    config: Config
    vault: BearerCheck
    tickets: BearerCheck
    planner_token: str
    sidecar_id: str = SIDECAR_ID  # the SPIFFE ID SPIRE gives this process first

    def fetches(self) -> int:
        return self.agent.jwt_svid_fetches(self.sidecar_id)

    def mcp_client(self) -> Client:
        # The timeouts the SDK gives the HTTP clients it makes itself (30 s, reads 300 s).
        http = httpx2.AsyncClient(headers={"authorization": f"Bearer {self.planner_token}"},
                                  timeout=httpx2.Timeout(30.0, read=300.0))
        return Client(streamable_http_client(self.sidecar.mcp.url, http_client=http))

    async def invoke(self, title: str) -> sidecar_pb2.InvokeResponse:
        args = Struct()
        args.update({"title": title})
        async with grpc.aio.insecure_channel(self.sidecar.addresses[0]) as channel:
            return await sidecar_pb2_grpc.ToolGateStub(channel).Invoke(
                sidecar_pb2.InvokeRequest(call=sidecar_pb2.AuthorizeRequest(tool="create_ticket", arguments=args)),
                metadata=[("authorization", f"Bearer {self.planner_token}")],
            )

    def evidence(self) -> list[dict]:
        out = []
        for path in sorted(Path(self.config.evidence.dir).glob("evidence-*.jsonl")):
            out += [json.loads(line) for line in path.read_text().splitlines() if line]
        return out

    def invocations(self) -> list[dict]:
        return [r for r in self.evidence() if r["kind"] == "invocation"]


@pytest.fixture
async def world(request, spire, tmp_path, running_sidecar):
    """The sidecar and both upstreams on an agent of its own. A test may parametrize `world`
    (indirect) with {"refresh": invoke.jwt_refresh_before_seconds (default REFRESH),
    "fetch_timeout": invoke.jwt_fetch_timeout_seconds (default: the config's 5 s),
    "also_registered_as": the path of a second entry for this process}."""
    options = getattr(request, "param", {})
    agent = spire.agent(f"node{next(AGENTS)}", log_level="DEBUG")
    agent.register(SIDECAR_PATH, *own_process_selectors(), dns=(SIDECAR_DNS,), jwt_ttl=JWT_TTL)
    sidecar_id = SIDECAR_ID
    if "also_registered_as" in options:
        agent.register(options["also_registered_as"], *own_process_selectors(), jwt_ttl=JWT_TTL)
        sidecar_id = await asyncio.to_thread(default_identity, agent, count=2)
    planner = agent.workload("planner")
    agent.register(PLANNER_PATH, *planner.selectors)
    planner.wait_for_identity()
    vault, tickets = BearerCheck(spire, VAULT_AUD, sidecar_id), BearerCheck(spire, TICKETS_AUD, sidecar_id)
    vault_up, tickets_up = await serve_vault(vault), await serve_tickets(tickets)
    config = load_config(None, {
        "listen.tcp": "127.0.0.1:0",
        "listen.unix": "",
        "policy.dir": str(write_policy(tmp_path / "rego", POLICY)),
        "policy.reload": False,
        "policy.timeout_ms": 5000,
        "sidecar.instance_id": "spire-credentials",
        "evidence.dir": str(tmp_path / "evidence"),
        "escalation.path": str(tmp_path / "escalations.db"),
        "escalation.approvers": ["email:*@example.org"],
        "telemetry.exporter": "none",
        "identity.sources": ["jwt_svid"],
        "identity.workload_api_socket": agent.endpoint,
        "identity.jwt_audience": SIDECAR_ID,
        "identity.max_delegation_links": 0,
        "identity.workload_api_max_backoff_ms": 200,
        "mcp.listen": "127.0.0.1:0",
        "mcp.upstreams": {"vault": {"url": vault_up.url, "timeout_seconds": 10,
                                    "credential": {"kind": "jwt_svid", "audience": VAULT_AUD}}},
        "invoke.tools": {"create_ticket": {"method": "POST", "url": tickets_up.url + "/tickets",
                                           "credential": {"kind": "jwt_svid", "audience": TICKETS_AUD}}},
        "invoke.jwt_refresh_before_seconds": options.get("refresh", REFRESH),
        **({"invoke.jwt_fetch_timeout_seconds": options["fetch_timeout"]} if "fetch_timeout" in options else {}),
    })
    sidecar = await running_sidecar(config)
    deadline = time.monotonic() + 30
    while not sidecar.identity.health()[0]:  # the JWT bundle for callers comes from the agent
        assert time.monotonic() < deadline, sidecar.identity.health()
        await asyncio.sleep(0.1)
    yield World(agent, sidecar, config, vault, tickets, planner.fetch_jwt(SIDECAR_ID), sidecar_id)
    await vault_up.stop()
    await tickets_up.stop()
    agent.stop()


def default_identity(agent: SpireAgent, count: int, timeout: float = 30.0) -> str:
    """The SPIFFE ID of the first X.509-SVID the agent gives this process, once it gives `count`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with WorkloadApiClient(agent.endpoint) as client:
                svids = client.fetch_x509_svids()
            if len(svids) >= count:
                return str(svids[0].spiffe_id)
        except Exception:  # PERMISSION_DENIED until the agent has synced the entries
            pass
        assert time.monotonic() < deadline, f"the agent gave this process fewer than {count} identities"
        time.sleep(0.2)


async def sleep_until(unix_time: float) -> None:
    await asyncio.sleep(max(0.0, unix_time - time.time()))


# ---------------------------------------------------------------- tests
async def test_each_upstream_gets_a_spire_jwt_svid_for_its_own_audience_never_the_agents(world, caplog):
    caplog.set_level(logging.DEBUG)
    async with world.mcp_client() as agent:
        result = await agent.call_tool("vault__read_secret", {"name": "db"})
    assert not result.is_error, result
    invoked = await world.invoke("disk full")
    assert invoked.decision.outcome == sidecar_pb2.OUTCOME_ALLOW
    assert (invoked.status, invoked.upstream_status) == ("ok", 201), invoked

    # What each upstream verified against SPIRE's bundle: the sidecar, for that upstream alone.
    assert world.vault.refused == [] and world.tickets.refused == []
    (vault_token,), (tickets_token,) = set(world.vault.tool_tokens), set(world.tickets.tool_tokens)
    for token, audience in ((vault_token, VAULT_AUD), (tickets_token, TICKETS_AUD)):
        assert claims(token)["sub"] == SIDECAR_ID and claims(token)["aud"] == [audience]
    # The agent's own token went to the sidecar only: in no header any upstream received.
    planner = world.planner_token
    assert claims(planner)["sub"] == PLANNER_ID
    for check in (world.vault, world.tickets):
        assert check.headers and not [h for h in check.headers if planner in json.dumps(h)]

    # The evidence names the credential by kind and SPIFFE ID, never by value;
    # neither the agent's answers nor the logs carry a token.
    by_upstream = {r["tool"]: r for r in world.invocations()}
    assert (by_upstream["read_secret"]["credential_kind"], by_upstream["read_secret"]["credential_id"]) == (
        "jwt_svid", f"{SIDECAR_ID} aud={VAULT_AUD}")
    assert (by_upstream["create_ticket"]["credential_kind"], by_upstream["create_ticket"]["credential_id"]) == (
        "jwt_svid", f"{SIDECAR_ID} aud={TICKETS_AUD}")
    raw = b"".join(p.read_bytes() for p in Path(world.config.evidence.dir).iterdir() if p.is_file())
    answers = result.model_dump_json() + str(invoked)
    for token in (vault_token, tickets_token, planner):
        signature = token.rsplit(".", 1)[1]
        assert signature.encode() not in raw and signature not in answers and signature not in caplog.text
    assert verify_dir(Path(world.config.evidence.dir)).ok


async def test_the_jwt_svid_is_cached_and_refetched_shortly_before_it_expires(world):
    async with world.mcp_client() as agent:
        assert not (await agent.call_tool("vault__read_secret", {"name": "a"})).is_error
        fetched = world.fetches()
        assert not (await agent.call_tool("vault__read_secret", {"name": "b"})).is_error
        # The second call asked SPIRE for nothing and the upstream saw the same token.
        assert world.fetches() == fetched
        first, again = world.vault.tool_tokens
        assert again == first

        assert (await world.invoke("one")).status == "ok"
        assert world.fetches() == fetched + 1  # another audience: a token of its own
        assert (await world.invoke("two")).status == "ok"
        assert world.fetches() == fetched + 1
        assert len(set(world.tickets.tool_tokens)) == 1

        # Inside the refresh margin the sidecar asks again, and SPIRE (past half the
        # token's lifetime) mints a new one; the old one has not expired yet.
        await sleep_until(claims(first)["exp"] - REFRESH + 0.5)
        assert not (await agent.call_tool("vault__read_secret", {"name": "c"})).is_error
    renewed = world.vault.tool_tokens[-1]
    assert renewed != first and claims(renewed)["iat"] > claims(first)["iat"]
    assert claims(renewed)["exp"] - claims(renewed)["iat"] == JWT_TTL  # SPIRE applied the entry's TTL
    assert world.fetches() == fetched + 2
    assert world.vault.refused == [] and world.tickets.refused == []  # never an expired or foreign token


# The hung agent's case: invoke.jwt_fetch_timeout_seconds well under the default 5 s, which each of its
# two refused calls (one per audience) would otherwise wait out; roomy enough for SPIRE's answers.
FETCH_TIMEOUT = 1.0


@pytest.mark.parametrize("outage, why, world", [
    ("stop", "does not exist", {}),  # the agent's socket is gone
    # the agent hangs: py-spiffe gives up at the sidecar's deadline, invoke.jwt_fetch_timeout_seconds
    ("pause", f"no answer within {FETCH_TIMEOUT:g} s (invoke.jwt_fetch_timeout_seconds; DEADLINE_EXCEEDED)",
     {"fetch_timeout": FETCH_TIMEOUT}),
], indirect=["world"], ids=["stop", "pause"])
async def test_spire_agent_down_fails_closed_and_no_call_goes_out_without_a_credential(world, outage, why):
    down, back = {"stop": (world.agent.stop, world.agent.start),
                  "pause": (world.agent.pause, world.agent.resume)}[outage]
    async with world.mcp_client() as agent:
        assert not (await agent.call_tool("vault__read_secret", {"name": "a"})).is_error
        assert (await world.invoke("before")).status == "ok"
        held = max(claims(world.vault.tool_tokens[-1])["exp"], claims(world.tickets.tool_tokens[-1])["exp"])
        requests = len(world.vault.headers), len(world.tickets.headers)

        down()
        await sleep_until(held - REFRESH + 0.5)  # both cached tokens are now due for renewal
        started = time.monotonic()
        refused = await agent.call_tool("vault__read_secret", {"name": "b"})
        not_made = await world.invoke("during")
        took = time.monotonic() - started
        if outage == "pause":  # both refusals together, at the configured deadline each: well under 5 s
            assert took < 5.0, took

        assert refused.is_error
        text = refused.content[0].text
        assert "credential_unavailable" in text and f"no JWT-SVID for audience {VAULT_AUD!r}" in text, text
        assert not_made.decision.outcome == sidecar_pb2.OUTCOME_ALLOW  # policy allowed; the sidecar could not call
        assert not_made.status == "not_called" and not_made.upstream_status == 0
        assert not_made.error.startswith(f"credential_unavailable: no JWT-SVID for audience {TICKETS_AUD!r}")
        assert why in not_made.error and why in text, (not_made.error, text)
        # Neither upstream got a request, with or without a credential.
        assert (len(world.vault.headers), len(world.tickets.headers)) == requests
        assert world.vault.refused == [] and world.tickets.refused == []
        failed = world.invocations()[-2:]
        assert [(r["tool"], r["status"], r["credential_kind"]) for r in failed] == [
            ("read_secret", "not_called", ""), ("create_ticket", "not_called", "")]
        assert all(r["reasons"][0].startswith("credential_unavailable: ") for r in failed)

        # The agent back: the next calls get fresh tokens.
        back()
        assert not (await agent.call_tool("vault__read_secret", {"name": "c"})).is_error
        assert (await world.invoke("after")).status == "ok"
    assert claims(world.vault.tool_tokens[-1])["exp"] > held
    assert verify_dir(Path(world.config.evidence.dir)).ok


@pytest.mark.parametrize("world", [{"refresh": 30}], indirect=True)  # the default margin, above JWT_TTL / 2
async def test_a_jwt_svid_shorter_than_twice_the_refresh_margin_is_cached_too(world):
    """SPIRE's agent hands back its cached JWT-SVID until about half its lifetime has passed
    (pkg/common/rotationutil): a sidecar asking again whenever less than the 30 s margin is
    left would ask on every call and get the same token back."""
    async with world.mcp_client() as agent:
        assert not (await agent.call_tool("vault__read_secret", {"name": "a"})).is_error
        fetched = world.fetches()
        assert not (await agent.call_tool("vault__read_secret", {"name": "b"})).is_error
        assert world.fetches() == fetched
        first = world.vault.tool_tokens[0]
        assert world.vault.tool_tokens == [first, first]

        await sleep_until(claims(first)["exp"] - 2)  # shortly before it expires: renewed
        assert not (await agent.call_tool("vault__read_secret", {"name": "c"})).is_error
    renewed = world.vault.tool_tokens[-1]
    assert renewed != first and claims(renewed)["iat"] > claims(first)["iat"]
    assert world.fetches() == fetched + 1
    assert world.vault.refused == []


CANARY_PATH = "/ns/agents/sa/sidecar-canary"


@pytest.mark.parametrize("world", [{"also_registered_as": CANARY_PATH}], indirect=True)
async def test_with_two_spire_identities_the_upstream_gets_the_one_spire_lists_first(world):
    """Two entries match the sidecar's process: SPIRE orders them by entry ID (an arbitrary
    but stable order, pkg/agent/manager/cache matchingEntries) and the sidecar presents the
    first, the same identity as its own default X.509-SVID; the record names that one."""
    assert world.sidecar_id in (SIDECAR_ID, f"spiffe://{TD}{CANARY_PATH}")
    async with world.mcp_client() as agent:
        assert not (await agent.call_tool("vault__read_secret", {"name": "a"})).is_error
        assert not (await agent.call_tool("vault__read_secret", {"name": "b"})).is_error
    assert (await world.invoke("t")).status == "ok"
    tokens = world.vault.tool_tokens + world.tickets.tool_tokens
    assert {claims(token)["sub"] for token in tokens} == {world.sidecar_id}
    assert world.vault.refused == [] and world.tickets.refused == []
    assert {r["credential_id"] for r in world.invocations()} == {
        f"{world.sidecar_id} aud={VAULT_AUD}", f"{world.sidecar_id} aud={TICKETS_AUD}"}
