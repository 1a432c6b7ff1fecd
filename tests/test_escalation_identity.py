"""Separation of duties with real SPIFFE identities: approvers are verified like any caller.

The sidecar runs with `identity.sources: [jwt_svid, workload_api]` on a fake
SPIRE Workload API (tests/doubles/fake_workload_api.py) that issues real
JWT-SVIDs. The agent (planner) calls on behalf of an orchestrator
(x-spiffe-delegation); approvers present their own JWT-SVIDs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import grpc
import jwt
import pytest

from sidecar.client import AsyncClient, delegated_by
from sidecar.escalation.client import ApprovalsClient, ApprovalsError
from sidecar.identity.delegation import link_audience
from tests.doubles.escalation import make_config, records
from tests.doubles.identity_harness import (
    SIDECAR_DNS,
    bearer,
    client_credentials,
    fake_agent,
    remove_dir,
    short_dir,
    until_serving,
)

SIDECAR_ID = "spiffe://example.org/ns/agents/sa/sidecar"
AUD = SIDECAR_ID
DELEGATION = "spiffe://example.org/agent-sidecar/delegation"
PLANNER = "spiffe://example.org/ns/agents/sa/planner"
ORCHESTRATOR = "spiffe://example.org/ns/agents/sa/orchestrator"
ALICE = "spiffe://example.org/humans/alice"
MALLORY = "spiffe://example.org/ns/agents/sa/mallory"
CONSOLE = "spiffe://example.org/ns/ops/sa/approvals-console"
EMAIL = {"to": "cfo@example.com", "body": "numbers"}


@pytest.fixture
async def world(tmp_path, running_sidecar):
    sockdir = short_dir()
    agent = fake_agent(sockdir, path="/ns/agents/sa/sidecar")
    config = make_config(
        tmp_path,
        **{
            "listen.unix": f"{sockdir}/sidecar.sock",
            "identity.sources": ["jwt_svid", "workload_api"],
            "identity.workload_api_socket": f"unix://{sockdir}/agent.sock",
            "identity.jwt_audience": AUD,
            "identity.delegation_audience": DELEGATION,
            "identity.workload_api_max_backoff_ms": 100,
            # workloads by their exact SPIFFE IDs (never a pattern), people by pattern
            "escalation.approvers": [ALICE, "email:*@example.org", PLANNER, ORCHESTRATOR, SIDECAR_ID],
            "escalation.console_identities": [CONSOLE],
        },
    )
    sidecar = await running_sidecar(config)
    await until_serving(sidecar.addresses[0])
    yield agent, sidecar
    agent.stop()
    remove_dir(sockdir)


async def test_approver_is_never_the_subject_nor_its_delegation_chain(world, tmp_path):
    agent, sidecar = world
    unix = next(a for a in sidecar.addresses if a.startswith("unix:"))
    tcp = sidecar.addresses[0]
    token = lambda who: agent.jwt_authority.mint(who, AUD)  # noqa: E731
    link = lambda who, to: agent.jwt_authority.mint(who, link_audience(DELEGATION, to=to))  # noqa: E731

    async with AsyncClient(unix, metadata=bearer(token(PLANNER))) as planner:
        with delegated_by(link(ORCHESTRATOR, PLANNER)):
            escalated = await planner.authorize("send_email", EMAIL)
    assert escalated.outcome == "escalate", escalated.reasons
    eid = escalated.escalation_id

    async def attempt(who: str | None, *, approver: str = "", address: str = tcp) -> ApprovalsError | dict:
        metadata = bearer(token(who)) if who else None
        async with ApprovalsClient(address, metadata=metadata) as approvals:
            try:
                return await approvals.approve(eid, approver=approver, note="attempt")
            except ApprovalsError as exc:
                return exc

    cases = {
        "the subject itself": (PLANNER, "", tcp, "PERMISSION_DENIED", "self_approval"),
        "an agent upstream in its chain": (ORCHESTRATOR, "", tcp, "PERMISSION_DENIED", "delegation_approval"),
        "not an approver": (MALLORY, "", tcp, "PERMISSION_DENIED", "not_an_approver"),
        "no credential over TCP": (None, "", tcp, "UNAUTHENTICATED", "unverified_caller"),
        "naming someone else without being a console": (ALICE, "email:bob@example.org", tcp, "PERMISSION_DENIED",
                                                         "approver_not_verified"),
    }
    for name, (who, approver, address, status, code) in cases.items():
        error = await attempt(who, approver=approver, address=address)
        assert isinstance(error, ApprovalsError), name
        assert (error.status, error.code) == (status, code), (name, error)

    delegated = lambda: (("authorization", f"Bearer {token(ALICE)}"),  # noqa: E731
                         ("x-spiffe-delegation", link(MALLORY, ALICE)))
    async with ApprovalsClient(tcp, metadata=delegated) as through_chain:
        with pytest.raises(ApprovalsError) as info:
            await through_chain.approve(eid)
        assert (info.value.status, info.value.code) == ("PERMISSION_DENIED", "delegated_approval")
        # nor read through one: Watch (which List and Get already refused) as much as List and Get
        for read in (through_chain.list(), through_chain.get(eid), _first_watched(through_chain)):
            assert (await _refusal(read)).code == "delegated_approval"

    async with ApprovalsClient(tcp, metadata=bearer(token(MALLORY))) as nosy:
        with pytest.raises(ApprovalsError) as info:
            await nosy.list()
        assert info.value.code == "not_an_approver"
    async with ApprovalsClient(tcp, metadata=bearer(token(ALICE))) as alice:
        assert (await alice.get(eid))["state"] == "pending"  # nothing changed

    # a console relaying a human signed in at its proxy
    approved = await attempt(CONSOLE, approver="email:bob@example.org")
    assert isinstance(approved, dict) and approved["approver"] == "email:bob@example.org"

    async with AsyncClient(unix, metadata=bearer(token(PLANNER))) as planner:
        undelegated = await planner.authorize("send_email", EMAIL, escalation_id=eid)
        assert undelegated.outcome == "deny" and "another delegation chain" in undelegated.reasons[0]
        with delegated_by(link(ORCHESTRATOR, PLANNER)):
            retry = await planner.authorize("send_email", EMAIL, escalation_id=eid)
    assert retry.outcome == "allow", retry.reasons

    log = records(tmp_path / "evidence")
    refusals = [r for r in log if r["kind"] == "approval" and r["outcome"] == "refused"]
    assert sorted(r["reasons"][0].split(":")[0] for r in refusals) == sorted(
        ["self_approval", "delegation_approval", "not_an_approver", "unverified_caller", "approver_not_verified",
         "delegated_approval"]
    )
    approval = next(r for r in log if r["kind"] == "approval" and r["outcome"] == "approved")
    assert approval["approver"] == "email:bob@example.org" and approval["approver_via"] == CONSOLE
    assert approval["approver_source"] == "console"
    assert [d["spiffe_id"] for d in approval["delegation"]] == [ORCHESTRATOR]


async def _refusal(attempt) -> ApprovalsError:
    try:
        await attempt
    except ApprovalsError as exc:
        return exc
    raise AssertionError("answered where it should have been refused")


async def _first_watched(approvals: ApprovalsClient) -> dict:
    async for escalation in approvals.watch():
        return escalation
    raise AssertionError("Watch ended without an answer")


async def test_the_pod_identity_never_approves_relays_or_reads(world, tmp_path, running_sidecar):
    """On the pod's unix socket every process of the agent's pod is the pod identity (workload_api), the
    agent included, and any of them may fetch it from the Workload API as a JWT-SVID too. Listed as an
    approver (as here: SIDECAR_ID), it let the planner, which escalates with its own JWT-SVID, drop the token
    (or present the pod's) and approve its own call, then run it; listed as a console, it let the agent relay
    any person. Now the pod identity, the sidecar's own, is refused on every Approvals call outside dev mode
    however it is presented (approver_not_verified), recorded, and the agent can only await its own escalation."""
    agent, sidecar = world
    unix = next(a for a in sidecar.addresses if a.startswith("unix:"))
    token = lambda who: agent.jwt_authority.mint(who, AUD)  # noqa: E731
    async with AsyncClient(unix) as pod:  # the pod's own call: its own subject
        own = (await pod.authorize("send_email", EMAIL)).escalation_id
    async with AsyncClient(unix, metadata=bearer(token(PLANNER))) as planner:
        escalated = await planner.authorize("send_email", EMAIL)
    assert escalated.outcome == "escalate", escalated.reasons
    eid = escalated.escalation_id

    # On the unix socket without a token; and with the pod's own JWT-SVID, which SPIRE hands any container
    # of the pod that asks its Workload API (registered for the pod): here minted by the same fake agent.
    tcp = sidecar.addresses[0]
    for way, (address, metadata) in {"workload_api": (unix, None),
                                     "jwt_svid": (tcp, bearer(token(SIDECAR_ID)))}.items():
        async with ApprovalsClient(address, metadata=metadata) as pod:
            for name, attempt in {
                "approve the planner's call": pod.approve(eid, note="me"),
                "deny it": pod.deny(eid, note="me"),
                "approve its own call": pod.approve(own),
                "relay a person": pod.approve(eid, approver="email:bob@example.org"),
                "list": pod.list(),
                "get": pod.get(eid),
                "watch": _first_watched(pod),
            }.items():
                refusal = await _refusal(attempt)
                assert (refusal.status, refusal.code) == ("PERMISSION_DENIED", "approver_not_verified"), \
                    (way, name, refusal)
                assert f"{SIDECAR_ID} ({way}) is the pod identity" in refusal.message, (way, name)
    async with AsyncClient(unix) as pod:  # AwaitDecision is the agent's own: still open to it for its own call
        assert (await pod.await_decision(own, timeout=0)).state == "pending"

    # A second registration matching the pod: the Workload API gives the sidecar both SVIDs, and the agent
    # may hold either; the second is refused like the first (it is not listed: an unlisted caller is
    # refused not_an_approver until the sidecar holds the new SVIDs, then approver_not_verified).
    sidekick = "spiffe://example.org/ns/agents/sa/pod-sidekick"
    agent.set_identity("/ns/agents/sa/sidecar", "/ns/agents/sa/pod-sidekick", dns_names=("sidecar.local",))
    deadline = time.monotonic() + 60
    async with ApprovalsClient(tcp, metadata=lambda: bearer(token(sidekick))()) as pod:
        while (refusal := await _refusal(pod.list())).code == "not_an_approver":
            assert time.monotonic() < deadline, "the sidecar never held the second SVID"
            await asyncio.sleep(0.05)
        assert refusal.code == "approver_not_verified" and f"{sidekick} (jwt_svid) is the pod identity" in \
            refusal.message, refusal
        refusal = await _refusal(pod.approve(eid))
        assert refusal.code == "approver_not_verified", refusal

    async with AsyncClient(unix, metadata=bearer(token(PLANNER))) as planner:
        retry = await planner.authorize("send_email", EMAIL, escalation_id=eid)
    assert retry.outcome == "escalate", retry.reasons  # nothing was approved
    async with ApprovalsClient(unix, metadata=bearer(token(ALICE))) as alice:  # a presented credential decides
        assert (await alice.approve(eid, note="checked"))["approver"] == ALICE
    refused = [r for r in records(tmp_path / "evidence")
               if r["kind"] in ("approval", "human_denial") and r["outcome"] == "refused"]
    assert [r["reasons"][0].split(":")[0] for r in refused] == ["approver_not_verified"] * 9

    # The pod identity named as a console: a pod caller relaying a person is refused all the same.
    as_console = make_config(tmp_path / "console", **{
        "listen.unix": unix.removeprefix("unix:") + "2",
        "identity.sources": ["workload_api", "jwt_svid"],
        "identity.workload_api_socket": f"unix://{agent.socket_path}",
        "identity.jwt_audience": AUD,
        "identity.max_delegation_links": 0,
        "escalation.approvers": ["email:*@example.org"],
        "escalation.console_identities": [SIDECAR_ID],
    })
    second = await running_sidecar(as_console)
    second_unix = next(a for a in second.addresses if a.startswith("unix:"))
    await until_serving(second.addresses[0])
    async with AsyncClient(second_unix, metadata=bearer(token(PLANNER))) as planner:
        # with workload_api first, the planner's token on the unix socket is the pod's call
        eid = (await planner.authorize("send_email", EMAIL)).escalation_id
    async with ApprovalsClient(second_unix, metadata=bearer(token(CONSOLE))) as pod_as_console:
        refusal = await _refusal(pod_as_console.approve(eid, approver="email:bob@example.org"))
        assert refusal.code == "approver_not_verified", refusal
        refusal = await _refusal(pod_as_console.list(approver="email:bob@example.org"))
        assert refusal.code == "approver_not_verified", refusal


async def test_another_callers_escalation_id_tells_nothing_of_its_call(world, tmp_path):
    """A call carrying another subject's escalation id is denied escalation_mismatch; the reason named that
    escalation's subject, tool, server and task ("another tool ('x', escalated for 'y')"), so whoever got
    hold of an id (a webhook, a trace, a log line) could read what the call was by presenting it. Now it
    says only that the escalation is another caller's; the call's own caller still hears every difference."""
    agent, sidecar = world
    unix = next(a for a in sidecar.addresses if a.startswith("unix:"))
    token = lambda who: agent.jwt_authority.mint(who, AUD)  # noqa: E731
    async with AsyncClient(unix, metadata=bearer(token(PLANNER))) as planner:
        eid = (await planner.authorize("send_email", EMAIL, task_id="q3-close", server="mail-eu")).escalation_id
        own = await planner.authorize("send_email", EMAIL, task_id="q4", server="mail-eu", escalation_id=eid)
    assert own.outcome == "deny" and "another task ('q4', escalated for 'q3-close')" in own.reasons[0]
    async with AsyncClient(unix, metadata=bearer(token(MALLORY))) as mallory:
        probe = await mallory.authorize("read_file", {"path": "/x"}, task_id="t", escalation_id=eid)
    assert probe.outcome == "deny" and probe.reasons[0].startswith(f"escalation_mismatch: escalation {eid} was made "
                                                                  "for another call"), probe.reasons
    assert f"another subject ({MALLORY}): the escalation is another caller's" in probe.reasons[0]
    for secret in (PLANNER, "send_email", "q3-close", "mail-eu", "escalated for"):
        assert secret not in probe.reasons[0], (secret, probe.reasons)
    record = next(r for r in records(tmp_path / "evidence") if r.get("decision_id") == probe.decision_id)
    assert record["outcome"] == "deny" and record["reasons"] == list(probe.reasons)


async def test_a_watch_stream_ends_when_the_credential_that_opened_it_does(world):
    """Watch checked its reader once, as the stream opened: a JWT-SVID valid for seconds kept a stream of
    every escalation (subject, tool, intent, argument preview) flowing for as long as the connection
    lasted, where any new call with that token was refused. Now each escalation goes only to a reader
    whose credential still verifies: past the token's exp the stream ends, unverified_caller."""
    agent, sidecar = world
    unix = next(a for a in sidecar.addresses if a.startswith("unix:"))
    planner = bearer(agent.jwt_authority.mint(PLANNER, AUD))
    short = agent.jwt_authority.mint(ALICE, AUD, ttl=3)
    expires_at = jwt.decode(short, options={"verify_signature": False})["exp"]
    async with ApprovalsClient(sidecar.addresses[0], metadata=bearer(short)) as alice, \
            AsyncClient(unix, metadata=planner) as agent_client:
        stream = alice.watch()
        first = await agent_client.authorize("send_email", EMAIL)
        assert (await anext(stream))["escalation_id"] == first.escalation_id  # read while the token is good
        await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.5)
        later = await agent_client.authorize("send_email", {**EMAIL, "body": "after the token expired"})
        assert later.outcome == "escalate", later.reasons
        with pytest.raises(ApprovalsError) as info:
            leaked = await anext(stream)
            raise AssertionError(f"sent to an expired token: {leaked}")
        assert (info.value.status, info.value.code) == ("UNAUTHENTICATED", "unverified_caller"), info.value
        assert "the token expired at" in info.value.message
        with pytest.raises(ApprovalsError) as again:  # as a new call with the same token is
            await alice.list()
        assert again.value.code == "unverified_caller"


async def alice_over_mtls(world, tmp_path, running_sidecar):
    """A sidecar beside the world's serving mutual TLS on TCP (Alice approves), its pod socket, and a
    client certificate of Alice's valid for 3 seconds."""
    agent, sidecar = world
    unix = next(a for a in sidecar.addresses if a.startswith("unix:"))
    mtls = await running_sidecar(make_config(tmp_path / "mtls", **{
        "listen.unix": unix.removeprefix("unix:") + "-mtls",
        "identity.sources": ["mtls", "workload_api"],
        "identity.workload_api_socket": f"unix://{agent.socket_path}",
        "identity.max_delegation_links": 0,
        "escalation.approvers": [ALICE],
    }))
    pod_socket = next(a for a in mtls.addresses if a.startswith("unix:"))
    await until_serving(pod_socket)  # the TCP listener serves mutual TLS only
    return mtls, pod_socket, agent.ca.issue("/humans/alice", ttl=3.0)


async def test_a_watch_stream_ends_when_its_client_certificate_expires(world, tmp_path, running_sidecar):
    """The same over mutual TLS: the connection outlives the client certificate it was opened with."""
    agent, _ = world
    mtls, pod_socket, short = await alice_over_mtls(world, tmp_path, running_sidecar)
    async with ApprovalsClient(mtls.addresses[0], credentials=client_credentials(short, agent.ca.bundle_pem()),
                               options=[("grpc.ssl_target_name_override", SIDECAR_DNS)]) as alice:
        stream = alice.watch()
        async with AsyncClient(pod_socket) as pod:
            first = await pod.authorize("send_email", EMAIL)
            assert (await anext(stream))["escalation_id"] == first.escalation_id
            delay = (short.cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).total_seconds() + 0.5
            await asyncio.sleep(max(delay, 0.0))
            assert (await pod.authorize("send_email", {**EMAIL, "body": "later"})).outcome == "escalate"
        with pytest.raises(ApprovalsError) as info:
            leaked = await anext(stream)
            raise AssertionError(f"sent over an expired client certificate: {leaked}")
    assert info.value.code == "unverified_caller" and "while its connection stayed open" in info.value.message


async def test_approval_is_a_human_act_workloads_only_when_named_exactly(world):
    """Issue 11 section 5: another AI agent's workload identity never approves unless the config names it."""
    agent, sidecar = world
    unix = next(a for a in sidecar.addresses if a.startswith("unix:"))
    tcp = sidecar.addresses[0]
    token = lambda who: agent.jwt_authority.mint(who, AUD)  # noqa: E731
    async with AsyncClient(unix, metadata=bearer(token(MALLORY))) as mallory:
        escalated = await mallory.authorize("send_email", EMAIL)
    eid = escalated.escalation_id

    async def attempt(who: str, approver: str = "") -> ApprovalsError | dict:
        async with ApprovalsClient(tcp, metadata=bearer(token(who))) as approvals:
            try:
                return await approvals.approve(eid, approver=approver, note="attempt")
            except ApprovalsError as exc:
                return exc

    refused = {
        # another agent, not listed
        "an unlisted agent": ("spiffe://example.org/ns/agents/sa/research", "", "not_an_approver"),
        # under a listed workload's path: exact IDs only, no prefixes
        "below a listed workload": (ALICE + "/bot", "", "not_an_approver"),
        # a console relays people, never a workload identity
        "a console relaying a workload": (CONSOLE, "spiffe://example.org/ns/agents/sa/research", "approver_not_a_person"),
        "a console relaying a listed workload": (CONSOLE, PLANNER, "approver_not_a_person"),
        "upper-case scheme": (CONSOLE, "SPIFFE://example.org/ns/agents/sa/research", "approver_not_a_person"),
        # a console itself is not an approver
        "the console as itself": (CONSOLE, "", "not_an_approver"),
    }
    for name, (who, approver, code) in refused.items():
        error = await attempt(who, approver)
        assert isinstance(error, ApprovalsError) and error.code == code, (name, error)
    assert "exact SPIFFE ID" in (await attempt("spiffe://example.org/ns/agents/sa/research")).message
    # A workload named exactly in escalation.approvers may approve (here: a listed agent, not the subject).
    approved = await attempt(PLANNER)
    assert isinstance(approved, dict) and approved["approver"] == PLANNER


async def test_a_console_reads_escalations_only_for_a_person_among_the_approvers(world, tmp_path):
    """escalation.approvers says who may list and read escalations: a person signed in at the console's
    proxy but not among them read every escalation's intent, signals and preview through the console.
    Now the sidecar refuses the console's List and Get for that person (not_an_approver), and the console
    shows them a 403 saying so, on every page, instead of the escalations."""
    import aiohttp

    from sidecar.console.app import start_console

    agent, sidecar = world
    unix = next(a for a in sidecar.addresses if a.startswith("unix:"))
    tcp = sidecar.addresses[0]
    token = lambda who: agent.jwt_authority.mint(who, AUD)  # noqa: E731
    async with AsyncClient(unix, metadata=bearer(token(PLANNER))) as planner:
        eid = (await planner.authorize("send_email", EMAIL, intent="the Q3 numbers")).escalation_id
    async with ApprovalsClient(tcp, metadata=bearer(token(CONSOLE))) as console:
        for read in (console.list(approver="email:eve@evil.org"), console.get(eid, approver="email:eve@evil.org")):
            with pytest.raises(ApprovalsError) as info:
                await read
            assert (info.value.status, info.value.code) == ("PERMISSION_DENIED", "not_an_approver")
            assert "email:eve@evil.org" in info.value.message
        assert [e["escalation_id"] for e in await console.list(approver="email:bob@example.org")] == [eid]
        assert (await console.get(eid, approver="email:bob@example.org"))["arguments"] == EMAIL

    token_file = tmp_path / "console.jwt"
    token_file.write_text(token(CONSOLE))
    config = make_config(tmp_path, **{
        "identity.sources": ["jwt_svid"], "identity.jwt_audience": AUD, "identity.max_delegation_links": 0,
        "escalation.approvers": ["email:*@example.org"], "escalation.console_identities": [CONSOLE],
        "console.trusted_header": "X-Auth-Request-Email", "console.token_file": str(token_file),
        "console.sidecar": tcp,
    })
    runner, port = await start_console(config, "127.0.0.1:0")
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/history", f"/escalations/{eid}"):
                async with http.get(f"http://127.0.0.1:{port}{path}",
                                    headers={"X-Auth-Request-Email": "eve@evil.org"}) as response:
                    page = await response.text()
                assert response.status == 403 and "not_an_approver" in page, (path, response.status)
                assert "the Q3 numbers" not in page and "send_email" not in page, path
            async with http.get(f"http://127.0.0.1:{port}/",
                                headers={"X-Auth-Request-Email": "bob@example.org"}) as response:
                assert response.status == 200 and "the Q3 numbers" in await response.text()
    finally:
        await runner.cleanup()


def test_serve_refuses_to_start_with_approvers_left_open(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "listen: {tcp: '127.0.0.1:0', unix: '%s'}\n"
        "identity: {sources: [workload_api]}\n"
        "evidence: {dir: '%s'}\n" % (tmp_path / "s.sock", tmp_path / "evidence")
    )
    done = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "escalation.approvers: required outside dev mode" in done.stderr
    assert not (tmp_path / "evidence").exists()  # refused before anything started


@pytest.mark.parametrize("credential", ["jwt_svid", "mtls"])
async def test_an_idle_watch_stream_ends_when_its_credential_expires_not_at_the_next_change(
        world, tmp_path, running_sidecar, credential):
    """A stream with nothing to send checked its reader only at the next change: one opened with a
    credential valid for seconds (a JWT-SVID, a client certificate) stayed open past its expiry for as
    long as nothing changed. Now it ends at the expiry."""
    agent, sidecar = world
    if credential == "jwt_svid":
        short = agent.jwt_authority.mint(ALICE, AUD, ttl=3)
        expires_at = jwt.decode(short, options={"verify_signature": False})["exp"]
        opened = ApprovalsClient(sidecar.addresses[0], metadata=bearer(short))
    else:
        mtls, _, short = await alice_over_mtls(world, tmp_path, running_sidecar)
        expires_at = short.cert.not_valid_after_utc.timestamp()
        opened = ApprovalsClient(mtls.addresses[0], credentials=client_credentials(short, agent.ca.bundle_pem()),
                                 options=[("grpc.ssl_target_name_override", SIDECAR_DNS)])
    async with opened as alice:
        with pytest.raises(ApprovalsError) as info:
            leaked = await asyncio.wait_for(anext(alice.watch()), expires_at - time.time() + 10)
            raise AssertionError(f"an escalation with nothing escalated: {leaked}")
    ended = time.time()
    assert (info.value.status, info.value.code) == ("UNAUTHENTICATED", "unverified_caller"), info.value
    assert expires_at - 0.1 <= ended <= expires_at + 3, (ended, expires_at)


async def test_await_decision_answers_only_a_caller_whose_token_still_verifies(world):
    """AwaitDecision verified its caller as the wait began: a JWT-SVID that expired during the wait (up to
    escalation.await_max_seconds) still got the answer, an approval among them. Now the wait ends at the
    token's exp and the caller is verified again before any answer: refused, unverified_caller."""
    agent, sidecar = world
    unix = next(a for a in sidecar.addresses if a.startswith("unix:"))
    short = agent.jwt_authority.mint(PLANNER, AUD, ttl=3)
    expires_at = jwt.decode(short, options={"verify_signature": False})["exp"]
    async with AsyncClient(unix, metadata=bearer(short)) as planner, \
            ApprovalsClient(sidecar.addresses[0], metadata=bearer(agent.jwt_authority.mint(ALICE, AUD))) as alice:
        eid = (await planner.authorize("send_email", EMAIL)).escalation_id
        waiting = asyncio.create_task(planner.await_decision(eid, 30))
        await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.5)
        approved = await alice.approve(eid)
        assert approved["state"] == "approved"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            answered = await asyncio.wait_for(waiting, 40)
            raise AssertionError(f"answered an expired token: {answered}")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details().startswith("unverified_caller: ") and "expired" in info.value.details()
