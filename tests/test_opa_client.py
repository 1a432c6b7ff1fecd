"""OpaClient against the real OPA (killed, stopped with SIGSTOP, strict built-in errors, exact input)
and against a tiny fault server for what a real OPA never answers (a proxy's 502, garbage).

Every failure is a DENY whose reason names OPA and whose `error` is set, and
the client recovers by itself when OPA does.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.policy.opa import tools
from sidecar.policy.opa.client import OpaClient, OpaClientOptions, request_body, revision_from_provenance
from sidecar.policy.opa.runner import OpaRunner, OpaRunOptions, find_opa
from tests import test_evidence_canonical
from tests.conftest import REGO, SIMPLE_POLICY, write_policy

INPUT = {"version": "sidecar/v1", "tool": {"name": "echo", "arguments": {}}}
ALLOW = {"outcome": "allow", "reasons": ["ok: fault server"], "obligations": {}}


@pytest.fixture
def short_dir():
    directory = Path(tempfile.mkdtemp(prefix="opa-c-"))  # unix socket paths are short
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def serve_opa(short_dir):
    """Start a real managed OPA on a policy directory or built bundle; stopped at the end."""
    runners: list[OpaRunner] = []

    async def start(bundle: Path, **options) -> OpaRunner:
        options = {"restart_backoff_seconds": 0.05, **options}
        runner = OpaRunner(OpaRunOptions(binary=find_opa(), bundle=bundle, socket=short_dir / f"opa{len(runners)}.sock",
                                         **options))
        await runner.start()
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        if runner.pid:
            try:
                os.kill(runner.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        await runner.aclose()


@pytest.fixture
async def make_client():
    clients: list[OpaClient] = []

    async def make(url: str, **settings) -> OpaClient:
        options = dict(timeout_ms=500, health_interval_ms=50, breaker_cooldown_ms=200)
        options.update(settings)
        client = OpaClient(url, OpaClientOptions(**options))
        await client.start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def assert_opa_deny(decision, code: str, url: str, *fragments: str) -> None:
    assert decision.outcome == "deny", decision
    assert len(decision.reasons) == 1
    reason = decision.reasons[0]
    assert reason.startswith(f"{code}: "), reason
    assert f"OPA at {url}" in reason, reason
    for fragment in fragments:
        assert fragment in reason, reason
    assert decision.error == reason
    assert decision.engine == "opa"


def stop(pid: int) -> None:
    """SIGSTOP a process and wait until every one of its threads is stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30  # as soon as all threads are stopped; room for a loaded machine
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, IndexError):
                pass
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"{pid} did not stop")


async def wait_for(predicate, timeout: float = 30.0) -> None:  # as soon as it holds; room for a loaded machine
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def decide_until_allowed(client: OpaClient, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        decision = await client.decide(INPUT)
        if decision.outcome == "allow" or time.monotonic() > deadline:
            return decision
        await asyncio.sleep(0.05)


# --- the real OPA ---------------------------------------------------------------------


async def test_decisions_and_the_revision_opa_reports(tmp_path, short_dir, serve_opa, make_client):
    policy = write_policy(tmp_path / "p", SIMPLE_POLICY)
    bundle = short_dir / "b.tar.gz"
    await tools.build(find_opa(), policy, bundle, "rev-test-1")
    opa = await serve_opa(bundle)
    client = await make_client(opa.url)
    allowed = await client.decide(INPUT)
    denied = await client.decide({**INPUT, "tool": {"name": "rm"}})
    assert (allowed.outcome, allowed.reasons, allowed.error) == ("allow", ("ok: listed",), None)
    assert (denied.outcome, denied.reasons) == ("deny", ("no rule allows this call",))
    assert allowed.policy_revision == "rev-test-1" == client.revision
    assert client.ready()[0]


STRICT = """\
    package sidecar

    default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

    decision := {"outcome": "allow", "reasons": ["ok: parsed"], "obligations": {}} if {
        time.parse_rfc3339_ns(input.request.time) > 0
    }
"""


async def test_builtin_errors_deny_and_quoted_values_stay_out_of_the_reason(tmp_path, serve_opa, make_client):
    opa = await serve_opa(write_policy(tmp_path / "p", STRICT))
    client = await make_client(opa.url)
    assert (await client.decide({"request": {"time": "2026-11-22T10:00:00Z"}})).outcome == "allow"
    decision = await client.decide({"request": {"time": "sk-live-5ecret"}})
    # OPA's default would make the failing call undefined and fall to the default decision;
    # with strict-builtin-errors the query fails: a deny naming OPA and the built-in.
    assert_opa_deny(decision, "policy_error", opa.url, "answered 500: internal_error", "time.parse_rfc3339_ns")
    assert "sk-live-5ecret" not in decision.reasons[0]  # reasons are recorded and exported in clear
    assert client.breaker.consecutive_failures == 0  # OPA answered: not an availability problem


@pytest.mark.parametrize(
    "rego, fragment",
    [
        ('package sidecar\ndecision := "allow"\n', "not an object"),
        ('package sidecar\ndecision := {"outcome": "maybe", "reasons": ["x"], "obligations": {}}\n', "outcome 'maybe'"),
        ('package sidecar\ndecision := {"outcome": "allow", "reasons": [], "obligations": {}}\n', "non-empty list"),
        ('package sidecar\ndecision := {"outcome": "allow", "reasons": ["x"], "obligations": {}, "x": 1}\n', "unknown keys: x"),
        ('package sidecar\ndecision := {"outcome": "allow", "reasons": ["x"], "obligations": {}} if input.nope\n', "is undefined"),
        ('package sidecar\nother := 1\n', "decision rule"),
    ],
)
async def test_malformed_or_undefined_decisions_deny(tmp_path, serve_opa, make_client, rego, fragment):
    opa = await serve_opa(write_policy(tmp_path / "p", rego))
    client = await make_client(opa.url)
    assert_opa_deny(await client.decide(INPUT), "policy_malformed", opa.url, fragment)


FIDELITY = r"""
    package sidecar

    checks contains "big" if input.big == 18446744073709551617
    checks contains "negative" if input.negative == -9223372036854775809
    checks contains "float" if input.float > 0.7
    checks contains "tiny" if input.tiny > 0
    checks contains "long" if count(input.long) == 100000
    checks contains "emoji" if input.emoji == "a😀b"
    checks contains "nul" if input.nul == "a\u0000b"
    checks contains "nested" if input.deep.a[0].b == 1.5
    checks contains "key" if input.keys["k\u0000ey"] == true
    checks contains "small" if input.small == 0.000000123
    checks contains "exact" if input.exact == 9007199254740991

    decision := {"outcome": "allow", "reasons": sort([c | some c in checks]), "obligations": {}}
"""


async def test_opa_receives_the_input_exactly(tmp_path, serve_opa, make_client):
    opa = await serve_opa(write_policy(tmp_path / "p", FIDELITY))
    client = await make_client(opa.url)
    document = {
        "big": 2**64 + 1,
        "negative": -(2**63) - 1,
        "float": 0.7000001,
        "tiny": 5e-324,
        "long": "x" * 100_000,
        "emoji": "a😀b",
        "nul": "a\u0000b",
        "deep": {"a": [{"b": 1.5}]},
        "keys": {"k\u0000ey": True},
        "small": 1.23e-7,
        "exact": 2**53 - 1,
    }
    decision = await client.decide(document)
    assert decision.outcome == "allow", decision
    every = ["big", "negative", "float", "tiny", "long", "emoji", "nul", "nested", "key", "small", "exact"]
    assert decision.reasons == tuple(sorted(every))
    # Without the integers past 64 bits the document is plain, and orjson writes it: the same values arrive.
    plain = {k: v for k, v in document.items() if k not in ("big", "negative")}
    assert request_body(plain) == orjson.dumps({"input": plain})
    decision = await client.decide(plain)
    assert decision.reasons == tuple(sorted(set(every) - {"big", "negative"}))


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(document=st.dictionaries(st.text(max_size=5), test_evidence_canonical.fast_values, max_size=5))
def test_the_request_body_carries_every_value_exactly(document):
    """Whichever writer it takes, the body reads back to the document, every number exactly; what is not
    JSON (NaN, infinities, lone surrogates, non-string keys) is refused, never sent changed."""
    try:
        body = request_body(document)
    except (TypeError, ValueError):
        with pytest.raises((TypeError, ValueError)):
            json.dumps(document, ensure_ascii=False, allow_nan=False).encode("utf-8")
        return
    assert same_json(json.loads(body), {"input": document})


def same_json(a, b) -> bool:
    """Equal as JSON values, numbers by value and type family (1 == 1.0, but True is not 1)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


async def test_input_that_is_not_json_is_denied_without_calling_opa(tmp_path, serve_opa, make_client):
    opa = await serve_opa(write_policy(tmp_path / "p", SIMPLE_POLICY))
    client = await make_client(opa.url)
    for document in ({"x": float("nan")}, {"x": float("inf")}, {"x": b"\x00"}, {"x": "\ud800"}):
        assert_opa_deny(await client.decide(document), "policy_error", opa.url, "was not called")
    assert client.breaker.consecutive_failures == 0


async def test_opa_killed_denies_then_recovers_when_it_is_restarted(tmp_path, serve_opa, make_client):
    # An hour before the runner restarts it: OPA stays down while we look.
    opa = await serve_opa(write_policy(tmp_path / "p", SIMPLE_POLICY), restart_backoff_seconds=3600)
    client = await make_client(opa.url, retries=0, breaker_failures=100)
    assert (await client.decide(INPUT)).outcome == "allow"
    os.kill(opa.pid, signal.SIGKILL)
    await wait_for(lambda: not opa.health()[0])  # the runner saw it die
    assert_opa_deny(await client.decide(INPUT), "policy_unavailable", opa.url, "unreachable")
    await wait_for(lambda: not client.ready()[0])
    await opa.aclose()
    again = await serve_opa(opa.options.bundle)  # the same bundle, a fresh OPA
    client = await make_client(again.url)
    assert (await client.decide(INPUT)).outcome == "allow"


async def test_opa_stopped_with_sigstop_times_out_opens_the_breaker_and_recovers(tmp_path, serve_opa, make_client):
    opa = await serve_opa(write_policy(tmp_path / "p", SIMPLE_POLICY))
    client = await make_client(opa.url, timeout_ms=150, breaker_failures=2, breaker_cooldown_ms=100)
    assert (await client.decide(INPUT)).outcome == "allow"
    stop(opa.pid)
    try:
        assert_opa_deny(await client.decide(INPUT), "policy_timeout", opa.url, "did not answer within 150 ms")
        assert_opa_deny(await client.decide(INPUT), "policy_timeout", opa.url)
        assert client.breaker.state == "open"
        assert_opa_deny(await client.decide(INPUT), "policy_unavailable", opa.url, "circuit breaker open")
        await wait_for(lambda: not client.ready()[0])
    finally:
        os.kill(opa.pid, signal.SIGCONT)
    decision = await decide_until_allowed(client)
    assert decision.outcome == "allow" and client.breaker.state == "closed"
    await wait_for(lambda: client.ready()[0])


async def test_a_starved_event_loop_does_not_make_a_healthy_opa_look_down(tmp_path, serve_opa, make_client):
    """Saturation delays every callback on the loop; OPA's health is judged in a thread (probe.py), so a late
    loop neither marks OPA unhealthy nor lets timeouts count against it (the breaker stays closed)."""
    opa = await serve_opa(write_policy(tmp_path / "p", SIMPLE_POLICY))
    client = await make_client(opa.url, health_interval_ms=20, health_timeout_ms=100)
    await wait_for(lambda: client.ready()[0])
    saturated = True

    async def busy() -> None:
        while saturated:
            time.sleep(0.005)  # CPU work between awaits, as a saturated sidecar's calls do
            await asyncio.sleep(0)

    workers = [asyncio.create_task(busy()) for _ in range(40)]  # each lap of the loop now takes ~200 ms
    await asyncio.sleep(1.5)  # health checks (100 ms budget) keep running meanwhile
    during = client.ready()
    saturated = False
    await asyncio.gather(*workers)
    assert during[0], during[1]
    # the other way round: an OPA that is really late still fails the check
    stop(opa.pid)
    try:
        await wait_for(lambda: not client.ready()[0])
        assert "did not answer within 100 ms (health check)" in client.ready()[1]
    finally:
        os.kill(opa.pid, signal.SIGCONT)
    await wait_for(lambda: client.ready()[0])


async def test_over_the_in_flight_bound_a_call_is_denied_at_once(tmp_path, serve_opa, make_client):
    opa = await serve_opa(write_policy(tmp_path / "p", SIMPLE_POLICY))
    client = await make_client(opa.url, timeout_ms=20_000, max_in_flight=2)
    stop(opa.pid)  # OPA holds the first two calls
    try:
        waiting = [asyncio.create_task(client.decide(INPUT)) for _ in range(2)]
        await wait_for(lambda: client.in_flight == 2 or any(t.done() for t in waiting))
        assert client.in_flight == 2, [t.result() for t in waiting if t.done()]
        refused = await client.decide(INPUT)
        assert not any(task.done() for task in waiting), [t.result() for t in waiting if t.done()]  # refused at once
        assert_opa_deny(refused, "overloaded", opa.url, "the limit is 2")
    finally:
        os.kill(opa.pid, signal.SIGCONT)
    held = await asyncio.gather(*waiting)
    assert [d.outcome for d in held] == ["allow", "allow"], held
    assert client.in_flight == 0


async def test_decide_never_raises_before_start():
    client = OpaClient("http://127.0.0.1:9")
    decision = await client.decide(INPUT)
    assert decision.outcome == "deny" and "not started" in decision.reasons[0]
    assert not client.ready()[0]


def test_revision_from_provenance_shapes():
    assert revision_from_provenance(None) == ""
    assert revision_from_provenance({"version": "1.0"}) == ""
    assert revision_from_provenance({"bundles": {"/policy": {"revision": ""}}}) == ""
    assert revision_from_provenance({"bundles": {"/policy": {"revision": "r1"}}}) == "r1"
    two = {"bundles": {"b": {"revision": "r2"}, "a": {"revision": "r1"}, "c": "junk"}}
    assert revision_from_provenance(two) == "a=r1,b=r2"


# --- what a real OPA never answers: the fault server ------------------------------------


class FaultServer:
    """A TEST DOUBLE for what stands between the sidecar and OPA failing: a proxy's 502/503,
    a process answering garbage or hanging up. A real OPA never answers like this, so these
    cases cannot be produced with it. It evaluates no Rego: it answers one fixed decision
    (`ALLOW`) or the fault it is told to (`faults`, one per request, then `default`).
    """

    def __init__(self, path: Path):
        self.path = path
        self.faults: list[str] = []
        self.default = "ok"
        self.requests = 0

    async def __aenter__(self) -> "FaultServer":
        app = web.Application()
        app.router.add_post("/v1/data/sidecar/decision", self._decision)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.path)).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _decision(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await request.read()
        fault = self.faults.pop(0) if self.faults else self.default
        if fault == "ok":
            return web.json_response({"result": ALLOW, "provenance": {"bundles": {"b": {"revision": "rev-f"}}}})
        if fault == "plain502":
            return web.Response(status=502, text="<html>upstream unavailable</html>")
        if fault == "opa500":
            return web.json_response({"code": "internal_error", "message": 'eval_builtin_error: parsing "s3cret"'}, status=500)
        if fault == "400":
            return web.json_response({"code": "invalid_parameter", "message": "bad input"}, status=400)
        if fault == "garbage":
            return web.Response(status=200, text="\x00\x01 not json")
        if fault == "list":
            return web.json_response([1, 2])
        if fault in ("nan", "overflow"):  # numbers that are not JSON or that no double holds (the gate's
            # check of what OPA can write, 2^70, is tested with real OPA in tests/test_opa_sidecar.py)
            number = {"nan": "NaN", "overflow": "1e400"}[fault]
            return web.Response(status=200, content_type="application/json", text=(
                '{"result": {"outcome": "allow", "reasons": ["ok"], "obligations": {"limit": %s}}}' % number))
        if fault == "slow":
            await asyncio.sleep(1.0)
            return web.json_response({"result": ALLOW})
        if fault == "drop":
            request.transport.close()
            return web.Response()
        raise AssertionError(fault)


@pytest.fixture
async def faults(short_dir):
    async with FaultServer(short_dir / "fault.sock") as server:
        yield server


async def test_a_plain_5xx_is_retried_inside_the_budget(faults, make_client):
    client = await make_client(faults.url, retries=2)
    faults.faults = ["plain502", "plain502"]
    decision = await client.decide(INPUT)
    assert decision.outcome == "allow" and faults.requests == 3
    assert decision.policy_revision == "rev-f"
    faults.default = "plain502"
    assert_opa_deny(await client.decide(INPUT), "policy_error", faults.url, "answered 502", "upstream unavailable",
                    "after 3 attempts")


async def test_opas_own_500_is_not_retried_and_does_not_count_against_it(faults, make_client):
    client = await make_client(faults.url, retries=2, breaker_failures=1)
    faults.default = "opa500"
    decision = await client.decide(INPUT)
    assert_opa_deny(decision, "policy_error", faults.url, "answered 500: internal_error: eval_builtin_error")
    assert "s3cret" not in decision.reasons[0]
    assert faults.requests == 1 and client.breaker.state == "closed"


async def test_4xx_is_not_retried_and_does_not_trip_the_breaker(faults, make_client):
    client = await make_client(faults.url, retries=2, breaker_failures=1)
    faults.default = "400"
    assert_opa_deny(await client.decide(INPUT), "policy_error", faults.url, "refused the query: 400", "invalid_parameter")
    assert faults.requests == 1 and client.breaker.state == "closed"


@pytest.mark.parametrize("fault, code, fragment", [
    ("garbage", "policy_error", "cannot be read as JSON"),
    ("list", "policy_error", "JSON list, not an object"),
    ("nan", "policy_error", "cannot be read as JSON"),  # not JSON at all
    ("overflow", "policy_error", "cannot be read as JSON"),  # 1e400: JSON, but no double holds it
])
async def test_garbage_answers_deny(faults, make_client, fault, code, fragment):
    client = await make_client(faults.url)
    faults.faults = [fault]
    assert_opa_deny(await client.decide(INPUT), code, faults.url, fragment)
    assert client.breaker.consecutive_failures == 1
    assert (await client.decide(INPUT)).outcome == "allow"


async def test_a_dropped_connection_is_retried_then_denied(faults, make_client):
    client = await make_client(faults.url, retries=2)
    faults.faults = ["drop"]
    assert (await client.decide(INPUT)).outcome == "allow"
    faults.default = "drop"
    assert_opa_deny(await client.decide(INPUT), "policy_unavailable", faults.url, "closed the connection")


async def test_the_breaker_fails_fast_probes_and_closes_when_opa_is_back(faults, make_client):
    client = await make_client(faults.url, breaker_failures=3, breaker_cooldown_ms=200, retries=0)
    faults.default = "plain502"
    for _ in range(3):
        assert_opa_deny(await client.decide(INPUT), "policy_error", faults.url, "answered 502")
    assert client.breaker.state == "open"
    sent = faults.requests
    for _ in range(20):
        assert_opa_deny(await client.decide(INPUT), "policy_unavailable", faults.url, "circuit breaker open")
    assert faults.requests == sent  # OPA is not hammered
    ready, detail = client.ready()
    assert not ready and "breaker open" in detail
    await wait_for(lambda: client.breaker.state == "half_open")
    assert_opa_deny(await client.decide(INPUT), "policy_error", faults.url, "answered 502")  # the failed probe
    assert faults.requests == sent + 1 and client.breaker.state == "open"
    faults.default = "ok"
    await wait_for(lambda: client.breaker.state == "half_open")
    assert (await client.decide(INPUT)).outcome == "allow"
    assert client.breaker.state == "closed"


async def test_a_timeout_while_opa_answers_others_is_overload_and_does_not_open_the_breaker(faults, make_client):
    client = await make_client(faults.url, timeout_ms=300, breaker_failures=1, retries=0)
    faults.faults = ["slow"]
    slow = asyncio.create_task(client.decide(INPUT))
    await wait_for(lambda: faults.requests == 1)
    assert (await client.decide(INPUT)).outcome == "allow"  # OPA answers meanwhile
    assert_opa_deny(await slow, "policy_timeout", faults.url, "did not answer within 300 ms")
    assert client.breaker.state == "closed"
    # With no answer in between, a timeout counts (OPA hung): the breaker opens.
    faults.faults = ["slow"]
    assert_opa_deny(await client.decide(INPUT), "policy_timeout", faults.url)
    assert client.breaker.state == "open"


@pytest.mark.parametrize(
    "expires, outcome",
    [
        ("9999-12-31T23:59:59Z", "allow"),  # X.509's "no expiry" (RFC 5280 4.1.2.5), past OPA's clock
        ("2262-04-12T00:00:00+01:00", "allow"),
        ("1677-09-21T00:00:00Z", "deny"),  # before OPA's clock: long expired
        ("0001-01-01T00:00:00Z", "deny"),
    ],
)
async def test_svid_expiries_outside_opas_clock_are_decided_by_the_shipped_bundle(
    serve_opa, make_client, expires, outcome
):
    """OPA's clock is int64 nanoseconds (1677-2262); with strict built-in errors (as the sidecar asks) a time
    outside used to fail every decision of such a caller as policy_error instead of deciding it."""
    runner = await serve_opa(REGO)
    client = await make_client(runner.url)
    document = {
        "version": "sidecar/v1",
        "request": {"call_id": "c", "time": "2026-11-22T10:00:00Z", "sidecar": "t", "phase": "call"},
        "subject": {"spiffe_id": "spiffe://dev.local/agent", "trust_domain": "dev.local", "path": "/agent",
                    "source": "dev", "svid_expires_at": expires},
        "delegation": [],
        "tool": {"name": "search_docs", "server": "", "arguments": {"query": "q"}, "catalog": None, "facts": {}},
        "task": {"id": "", "intent": ""},
        "signals": {},
        "approval": None,
        "usage": {"calls_in_window": 1, "window_seconds": 60, "calls_in_task": 1},
    }
    decision = await client.decide(document)
    assert decision.error is None, decision.reasons
    assert decision.outcome == outcome, decision.reasons
    if outcome == "deny":
        assert decision.reasons == (f"svid_expired: the SVID of spiffe://dev.local/agent expired at {expires}",)
