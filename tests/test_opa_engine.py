"""The OPA engine against the OPA-REST-compatible TEST DOUBLE (tests/doubles/opa_server.py).

No OPA binary can be installed on these machines, so OPA is played by the
test double, which speaks OPA's REST API and can be slow, answer 500s, drop
connections, answer a wrong-shape result or undefined, serve a bundle without
the decision rule, and be stopped and restarted on the same port. Every
failure must be a DENY whose reason names OPA, and the engine must recover by
itself when OPA is back.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from sidecar.policy.bundle import BundleError, load_bundle
from sidecar.policy.opa import OpaEngine, revision_from_provenance
from tests.conftest import REGO, write_policy
from tests.doubles.opa_server import OpaTestServer

GRANTED = "spiffe://example.org/ns/agents/sa/research-agent"


def make_input(tool: str = "search_docs", arguments: dict | None = None, **overrides) -> dict:
    document = {
        "version": "sidecar/v1",
        "subject": {
            "spiffe_id": GRANTED,
            "trust_domain": "example.org",
            "path": "/ns/agents/sa/research-agent",
            "source": "workload_api",
            "svid_expires_at": None,
        },
        "delegation": [],
        "tool": {"name": tool, "server": "", "arguments": arguments if arguments is not None else {"query": "sidecar"}, "catalog": None},
        "task": {"id": "t-1", "intent": "test"},
        "signals": {"risk_score": 0.1},
        "approval": None,
        "usage": {"calls_in_window": 1, "window_seconds": 60, "calls_in_task": 1},
        "request": {"call_id": "c-1", "time": "2026-11-22T10:00:00Z", "sidecar": "test"},
    }
    document.update(overrides)
    return document


@pytest.fixture
async def opa():
    async with OpaTestServer(REGO) as server:
        yield server


@pytest.fixture
async def make_engine(opa):
    engines: list[OpaEngine] = []

    async def make(**settings) -> OpaEngine:
        options = {"url": opa.url, "timeout_ms": 100, "reload": False, "health_interval_ms": 50, "breaker_cooldown_ms": 300}
        options.update(settings)
        engine = OpaEngine(options.pop("directory", REGO), **options)
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.close()


def assert_opa_deny(decision, code: str, opa_url: str, *fragments: str) -> None:
    assert decision.outcome == "deny", decision
    assert len(decision.reasons) == 1
    reason = decision.reasons[0]
    assert reason.startswith(f"{code}: OPA at {opa_url} "), reason
    for fragment in fragments:
        assert fragment in reason, reason
    assert decision.error == reason  # recorded as the engine error in evidence
    assert decision.engine == "opa"
    assert decision.policy_revision  # still says which policy was meant to decide


async def assert_recovers(engine: OpaEngine, opa: OpaTestServer) -> None:
    decision = await engine.evaluate(make_input())
    assert decision.outcome == "allow", decision
    assert decision.error is None


# --- the happy path -----------------------------------------------------------


async def test_allow_with_decision_id_revision_and_catalog(make_engine, opa):
    engine = await make_engine()
    decision = await engine.evaluate(make_input())
    assert decision.outcome == "allow"
    assert decision.reasons and all(isinstance(r, str) for r in decision.reasons)
    assert decision.engine == "opa" and decision.error is None
    assert decision.engine_decision_id  # OPA's decision_id (decision logging on)
    # No .manifest revision in rego/: the revision is the local bundle's digest.
    assert decision.policy_revision == load_bundle(REGO).revision == engine.revision
    assert engine.catalog_entry("search_docs")["risk"] == "low"
    assert engine.catalog_entry("no_such_tool") is None
    assert opa.inputs[-1] == make_input()  # the input document went over unchanged


async def test_deny_and_escalate_come_through_as_policy_decisions(make_engine):
    engine = await make_engine()
    denied = await engine.evaluate(make_input("delete_records", {"table": "orders", "ids": [1]}))
    assert denied.outcome == "deny" and denied.error is None
    assert any(r.startswith("not_granted: ") for r in denied.reasons)
    escalated = await engine.evaluate(make_input(signals={"risk_score": 0.99}))
    assert escalated.outcome == "escalate" and escalated.error is None


async def test_revision_comes_from_opa_provenance_when_it_reports_one(make_engine, opa):
    opa.revision_override = "rego-2026-11-22.1"
    engine = await make_engine()
    decision = await engine.evaluate(make_input())
    assert decision.policy_revision == "rego-2026-11-22.1" == engine.revision
    assert engine.local_revision == load_bundle(REGO).revision


def test_revision_from_provenance_shapes():
    assert revision_from_provenance(None) == ""
    assert revision_from_provenance({"version": "1.0"}) == ""
    assert revision_from_provenance({"bundles": {"/policy": {"revision": ""}}}) == ""
    assert revision_from_provenance({"bundles": {"/policy": {"revision": "r1"}}}) == "r1"
    two = {"bundles": {"b": {"revision": "r2"}, "a": {"revision": "r1"}, "c": "junk"}}
    assert revision_from_provenance(two) == "a=r1,b=r2"


async def test_connections_are_reused(make_engine, opa):
    engine = await make_engine()
    for _ in range(30):
        assert (await engine.evaluate(make_input())).outcome == "allow"
    # One pooled keep-alive connection for sequential calls (plus the health poller's).
    assert opa.data_requests == 30
    assert len(opa.client_ports) <= 3


# --- every failure mode: a DENY naming OPA, then recovery ----------------------


async def test_opa_down_denies_and_recovers_when_it_is_back(make_engine, opa):
    engine = await make_engine()
    await opa.stop()
    decision = await engine.evaluate(make_input())
    assert_opa_deny(decision, "policy_unavailable", opa.url, "connection")
    await opa.start()  # same port
    await assert_recovers(engine, opa)


async def test_opa_down_before_the_sidecar_starts(opa, make_engine):
    await opa.stop()
    engine = await make_engine()  # starting does not need OPA
    assert not engine.health()[0]
    assert_opa_deny(await engine.evaluate(make_input()), "policy_unavailable", opa.url, "connection refused")
    await opa.start()
    await assert_recovers(engine, opa)


async def test_slow_past_the_budget_denies_within_the_budget(make_engine, opa):
    engine = await make_engine(timeout_ms=100)
    opa.delay = 0.3
    started = time.perf_counter()
    decision = await engine.evaluate(make_input())
    elapsed = time.perf_counter() - started
    assert_opa_deny(decision, "policy_unavailable", opa.url, "did not answer within 100 ms")
    assert elapsed < 0.3  # the budget, not OPA's delay, bounds the call
    opa.delay = 0
    await assert_recovers(engine, opa)


async def test_500_is_retried_inside_the_budget(make_engine, opa):
    engine = await make_engine(retries=2)
    opa.fail_next, opa.plain_errors = 2, True  # two 500s, then a good answer: still an allow
    decision = await engine.evaluate(make_input())
    assert decision.outcome == "allow"
    assert opa.data_requests == 3


async def test_persistent_5xx_denies_after_the_retries(make_engine, opa):
    engine = await make_engine(retries=2)
    opa.status, opa.plain_errors = 502, True
    decision = await engine.evaluate(make_input())
    assert_opa_deny(decision, "policy_error", opa.url, "answered 502", "upstream unavailable", "after 3 attempts")
    assert opa.data_requests == 3
    opa.status = None
    await assert_recovers(engine, opa)


async def test_opa_error_500_denies_with_opas_message_without_retrying(make_engine, opa):
    engine = await make_engine(retries=2)
    opa.status = 500  # {"code": "internal_error", "message": ...}
    decision = await engine.evaluate(make_input())
    assert_opa_deny(decision, "policy_error", opa.url, "answered 500: internal_error: injected status 500")
    assert opa.data_requests == 1  # OPA's deterministic answer for this input
    opa.status = None
    await assert_recovers(engine, opa)


async def test_values_quoted_in_opa_errors_stay_out_of_reasons(make_engine, opa):
    engine = await make_engine()
    opa.status = 500
    opa.error_message = 'policy.rego:7: eval_builtin_error: time.parse_rfc3339_ns: parsing time "sk-live-5ecret" as "x"'
    decision = await engine.evaluate(make_input())
    assert_opa_deny(decision, "policy_error", opa.url, "eval_builtin_error: time.parse_rfc3339_ns: parsing time")
    assert "sk-live-5ecret" not in decision.reasons[0]  # reasons are recorded and exported in clear


async def test_builtin_errors_are_strict_as_in_the_embedded_engine(make_engine, opa, tmp_path):
    bundle = write_policy(
        tmp_path / "strict",
        """\
        package sidecar

        default decision := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": {}}

        decision := {"outcome": "allow", "reasons": ["ok: parsed"], "obligations": {}} if {
            time.parse_rfc3339_ns(input.request.time) > 0
        }
        """,
    )
    opa.set_bundle(bundle)
    engine = await make_engine(directory=bundle)
    good = {"call_id": "c", "time": "2026-11-22T10:00:00+00:00", "sidecar": "t"}
    assert (await engine.evaluate(make_input(request=good))).outcome == "allow"
    decision = await engine.evaluate(make_input(request=dict(good, time="yesterday")))
    # OPA's default would make the failing call undefined (and fall to the default decision);
    # with strict-builtin-errors the query fails, as in the embedded engine: a deny naming OPA.
    assert_opa_deny(decision, "policy_error", opa.url, "answered 500: internal_error")
    assert opa.queries[-1]["strict-builtin-errors"] == "true" and opa.queries[-1]["provenance"] == "true"


async def test_4xx_is_not_retried_and_does_not_trip_the_breaker(make_engine, opa):
    engine = await make_engine(retries=2, breaker_failures=1)
    opa.status = 400
    decision = await engine.evaluate(make_input())
    assert_opa_deny(decision, "policy_error", opa.url, "refused the query: 400", "invalid_parameter")
    assert opa.data_requests == 1
    assert engine.breaker.state == "closed"


async def test_dropped_connection_is_retried_then_denied(make_engine, opa):
    engine = await make_engine(retries=2)
    opa.drop_next = 1
    assert (await engine.evaluate(make_input())).outcome == "allow"
    opa.drop = True
    decision = await engine.evaluate(make_input())
    assert_opa_deny(decision, "policy_unavailable", opa.url, "closed the connection without answering")
    opa.drop = False
    await assert_recovers(engine, opa)


@pytest.mark.parametrize(
    "result, fragment",
    [
        ({"outcome": "allow"}, "reasons must be a non-empty list"),
        ({"outcome": "maybe", "reasons": ["x"], "obligations": {}}, "outcome 'maybe'"),
        ("allow", "not an object"),
        (True, "not an object"),
        ({"outcome": "allow", "reasons": ["x"], "obligations": {}, "extra": 1}, "unknown keys: extra"),
    ],
)
async def test_wrong_shape_result_denies(make_engine, opa, result, fragment):
    engine = await make_engine()
    opa.result = result
    decision = await engine.evaluate(make_input())
    assert_opa_deny(decision, "policy_malformed", opa.url, fragment)
    assert engine.breaker.consecutive_failures == 0  # OPA answered: not an availability problem
    opa.reset_faults()
    await assert_recovers(engine, opa)


async def test_undefined_decision_denies(make_engine, opa):
    engine = await make_engine()
    opa.undefined = True
    decision = await engine.evaluate(make_input())
    assert_opa_deny(decision, "policy_malformed", opa.url, "data.sidecar.decision is undefined")
    opa.undefined = False
    await assert_recovers(engine, opa)


async def test_bundle_missing_the_decision_rule_denies(make_engine, opa, tmp_path):
    broken = tmp_path / "no-decision"
    shutil.copytree(REGO, broken)
    (broken / "sidecar" / "decision.rego").unlink()
    engine = await make_engine()
    opa.set_bundle(broken)  # OPA activates a bundle without data.sidecar.decision
    decision = await engine.evaluate(make_input())
    assert_opa_deny(decision, "policy_malformed", opa.url, "undefined", "decision rule")
    opa.set_bundle(REGO)
    await assert_recovers(engine, opa)


async def test_input_that_is_not_json_is_denied_without_calling_opa(make_engine, opa):
    engine = await make_engine()
    decision = await engine.evaluate(make_input(signals={"score": float("nan")}))
    assert_opa_deny(decision, "policy_error", opa.url, "cannot be sent")
    decision = await engine.evaluate(make_input(signals={"blob": b"\x00"}))
    assert decision.outcome == "deny" and "OPA" in decision.reasons[0]
    assert opa.data_requests == 0


async def test_opa_restart_with_pooled_connections(make_engine, opa):
    engine = await make_engine(retries=2)
    assert (await engine.evaluate(make_input())).outcome == "allow"
    await opa.stop()
    await opa.start()
    # The pooled connection died with the old OPA; the retry takes a new one.
    await assert_recovers(engine, opa)


async def test_evaluate_never_raises_before_start():
    engine = OpaEngine(REGO, url="http://127.0.0.1:9")
    decision = await engine.evaluate(make_input())
    assert decision.outcome == "deny" and "not started" in decision.reasons[0]
    assert engine.health() == (False, f"no local policy bundle loaded from {REGO}")
    await engine.close()


async def test_a_bad_local_bundle_stops_start(tmp_path):
    engine = OpaEngine(tmp_path / "missing", url="http://127.0.0.1:9")
    with pytest.raises(BundleError):
        await engine.start()
    await engine.close()


# --- the circuit breaker --------------------------------------------------------


async def test_breaker_opens_fails_fast_and_closes_when_opa_is_back(make_engine, opa):
    engine = await make_engine(breaker_failures=3, breaker_cooldown_ms=200, retries=0)
    opa.status, opa.plain_errors = 503, True  # not OPA's error shape: something in the way, or a crash
    for _ in range(3):
        assert_opa_deny(await engine.evaluate(make_input()), "policy_error", opa.url, "answered 503")
    assert engine.breaker.state == "open"
    sent = opa.data_requests
    started = time.perf_counter()
    for _ in range(20):
        decision = await engine.evaluate(make_input())
        assert_opa_deny(decision, "policy_unavailable", opa.url, "circuit breaker open", "answered 503")
    assert time.perf_counter() - started < 0.1  # fail fast, no network
    assert opa.data_requests == sent  # OPA is not hammered
    ok, detail = engine.health()
    assert not ok and "breaker open" in detail

    # Still failing at the probe: re-opens for another cool-down.
    await asyncio.sleep(0.21)
    assert_opa_deny(await engine.evaluate(make_input()), "policy_error", opa.url, "answered 503")
    assert opa.data_requests == sent + 1
    assert engine.breaker.state == "open"

    # OPA is back: the next probe closes the breaker.
    opa.status = None
    await asyncio.sleep(0.21)
    await assert_recovers(engine, opa)
    assert engine.breaker.state == "closed"
    await assert_recovers(engine, opa)


async def test_opa_evaluation_errors_do_not_open_the_breaker(make_engine, opa):
    engine = await make_engine(breaker_failures=2, retries=0)
    opa.status = 500  # {"code": "internal_error", ...}: OPA is up, the policy failed on this input
    for _ in range(5):
        assert_opa_deny(await engine.evaluate(make_input()), "policy_error", opa.url, "answered 500: internal_error")
    assert engine.breaker.state == "closed" and engine.breaker.consecutive_failures == 0
    opa.status = None
    await assert_recovers(engine, opa)


async def test_breaker_counts_timeouts_and_unreachable(make_engine, opa):
    engine = await make_engine(breaker_failures=2, timeout_ms=60)
    opa.delay = 0.2
    await engine.evaluate(make_input())
    await opa.stop()
    await engine.evaluate(make_input())
    assert engine.breaker.state == "open"
    assert engine.breaker.times_opened == 1


# --- health ---------------------------------------------------------------------------


async def wait_for(predicate, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_health_follows_opa_health_bundles(make_engine, opa):
    engine = await make_engine(health_interval_ms=20)
    ok, detail = engine.health()
    assert ok and f"OPA at {opa.url} is healthy" in detail and engine.revision in detail
    opa.healthy = False  # /health?bundles: bundles not activated
    await wait_for(lambda: not engine.health()[0])
    assert "one or more bundles are not activated" in engine.health()[1]
    opa.healthy = True
    await wait_for(lambda: engine.health()[0])
    await opa.stop()
    await wait_for(lambda: not engine.health()[0])
    assert "connection refused" in engine.health()[1]
    await opa.start()
    await wait_for(lambda: engine.health()[0])
    assert opa.health_requests >= 4


async def test_slow_health_check_is_bounded(make_engine, opa):
    engine = await make_engine(health_timeout_ms=50)
    opa.health_delay = 0.3
    started = time.perf_counter()
    ok, detail = await engine.check_health()
    assert not ok and "did not answer its health check within 50 ms" in detail
    assert time.perf_counter() - started < 0.2


# --- the local bundle: catalog and fallback revision --------------------------------


def with_owner(catalog: Path, owner: str) -> str:
    data = yaml.safe_load(catalog.read_text())
    data["tools"]["search_docs"]["owner"] = owner
    return yaml.safe_dump(data)


async def test_local_catalog_reloads_and_a_bad_bundle_keeps_the_old_one(make_engine, shipped_bundle):
    engine = await make_engine(directory=shipped_bundle)
    before = engine.local_revision
    catalog = shipped_bundle / "sidecar" / "catalog" / "data.yaml"
    catalog.write_text(with_owner(catalog, "search-team"))
    assert await engine.reload()
    assert engine.catalog_entry("search_docs")["owner"] == "search-team"
    assert engine.local_revision != before
    (shipped_bundle / "sidecar" / "broken.rego").write_text("package sidecar\nthis is not rego {\n")
    assert not await engine.reload()
    assert engine.catalog_entry("search_docs")["owner"] == "search-team"
    assert "last local bundle reload rejected" in engine.health()[1]


async def test_local_catalog_is_watched(make_engine, shipped_bundle):
    engine = await make_engine(directory=shipped_bundle, reload=True)
    catalog = shipped_bundle / "sidecar" / "catalog" / "data.yaml"
    changed = with_owner(catalog, "watched-team")
    for _ in range(20):  # rewrite until seen: the watcher may not be watching yet on a busy machine
        catalog.write_text(changed)
        try:
            await wait_for(lambda: (engine.catalog_entry("search_docs") or {}).get("owner") == "watched-team", 0.5)
            break
        except AssertionError:
            continue
    assert engine.catalog_entry("search_docs")["owner"] == "watched-team"


# --- the test double itself speaks OPA's REST shapes ------------------------------------


async def test_double_speaks_opas_rest_shapes(opa):
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{opa.url}/v1/data/sidecar/decision?provenance", json={"input": make_input()}) as r:
            body = await r.json()
            assert r.status == 200 and set(body) == {"result", "decision_id", "provenance"}
            assert body["provenance"]["bundles"][str(REGO)] == {"revision": ""}
        async with http.post(f"{opa.url}/v1/data/sidecar/no_such_rule", json={"input": {}}) as r:
            assert r.status == 200 and "result" not in await r.json()  # undefined: {} (+ decision_id)
        async with http.post(f"{opa.url}/v1/data/sidecar/decision", data=b"{not json") as r:
            body = await r.json()
            assert r.status == 400 and body["code"] == "invalid_parameter" and body["message"]
        opa.fail_next = 1
        async with http.post(f"{opa.url}/v1/data/sidecar/decision", json={"input": {}}) as r:
            assert r.status == 500 and (await r.json())["code"] == "internal_error"
        async with http.get(f"{opa.url}/health?bundles") as r:
            assert r.status == 200 and await r.json() == {}
        opa.healthy = False
        async with http.get(f"{opa.url}/health?bundles=true") as r:
            assert r.status == 500 and "error" in await r.json()
        async with http.get(f"{opa.url}/health") as r:
            assert r.status == 200
    assert json.dumps(opa.inputs[0], sort_keys=True) == json.dumps(make_input(), sort_keys=True)
