"""Parity: the same rego/ bundle decides identically through the embedded engine and the OPA engine.

Two corpora of input documents go through both engines, and the outcome,
reasons and obligations must be identical, with no engine error on either
side:

1. every input document the policy tests (rego/**/*_test.rego) evaluate:
   collected by running those tests with one extra rule in package sidecar
   that prints `input` whenever the deny set is evaluated (and adds nothing).
   This runs in a child process — the embedded interpreter is native code and
   some Rego crashes it — and is cached by bundle revision in pytest's cache,
   since running the policy tests takes seconds;
2. a generated corpus: a seeded random walk over the bundle's own catalog
   tools and grants × subjects × arguments × signals × usage × delegation ×
   approval × versions × SVID expiry, including values that must be denied.

OPA is the OPA-REST-compatible TEST DOUBLE (tests/doubles/opa_server.py):
no OPA binary can be installed on these machines. The double evaluates with
the same interpreter as the embedded engine, so here parity checks the
whole OPA path (JSON on the wire, the REST shapes, provenance, the engine's
parsing) rather than two Rego implementations. To check against a real OPA,
run one on the bundle and point the test at it:

    opa run --server --addr 127.0.0.1:8181 --bundle rego/
    AGENT_SIDECAR_TEST_OPA_URL=http://127.0.0.1:8181 pytest tests/test_opa_parity.py
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from sidecar.policy.bundle import PolicyBundle, load_bundle
from sidecar.policy.embedded import EmbeddedEngine
from sidecar.policy.opa import OpaEngine
from tests.conftest import REGO, REPO
from tests.doubles.opa_server import OpaTestServer


REAL_OPA = os.environ.get("AGENT_SIDECAR_TEST_OPA_URL", "")
CORPUS_SIZE = 200
SEED = 20261122

# --- 1. the inputs of the policy tests ------------------------------------------------

_MARK = "PARITY-INPUT "
_TRACE_MODULE = """package sidecar

# Added by tests/test_opa_parity.py only: print every input the policy tests evaluate.
deny contains "parity-trace" if {
\tprint("PARITY-INPUT", json.marshal(input))
\tfalse
}
"""

_COLLECTOR = """
import dataclasses, os, sys
from sidecar.policy.bundle import load_bundle
from sidecar.policy.compiler import discover_tests, new_interpreter, query

bundle = load_bundle(sys.argv[1])
bundle = dataclasses.replace(bundle, modules={**bundle.modules, "zz_parity_trace.rego": sys.argv[2]})
tests = discover_tests(bundle)
entrypoints = [rule.replace(".", "/") for _, _, rule in tests]
interpreter = new_interpreter(bundle, with_tests=True)
compiled = interpreter.build(None, entrypoints)
for index in range(int(sys.argv[3]), len(tests)):
    os.write(2, b"START %d\\n" % index)
    try:
        query(interpreter, compiled, entrypoints[index])
    except Exception:
        pass  # a failing policy test still showed us its inputs
os.write(2, b"DONE\\n")
"""


def _decode_print(line: str) -> Any:
    """regopy prints a string argument JSON-escaped without its quotes."""
    return json.loads(json.loads('"' + line + '"'))


def collect_policy_test_inputs(bundle_dir: Path) -> list[dict]:
    """Run the policy tests with the trace rule in child processes; a crash resumes after the crashed test."""
    seen: dict[str, dict] = {}
    start, children = 0, 0
    while True:
        children += 1
        child = subprocess.run(
            [sys.executable, "-c", _COLLECTOR, str(bundle_dir), _TRACE_MODULE, str(start)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        for line in child.stdout.splitlines():
            if line.startswith(_MARK):
                document = _decode_print(line[len(_MARK) :])
                seen.setdefault(json.dumps(document, sort_keys=True), document)
        progress = child.stderr.splitlines()
        if "DONE" in progress:
            break
        started = [int(line.split()[1]) for line in progress if line.startswith("START ")]
        if not started or children > 20:
            raise AssertionError(
                f"running the policy tests to collect their inputs failed (exit {child.returncode}): "
                f"{child.stderr.strip()[-500:]}"
            )
        start = started[-1] + 1  # the interpreter crashed in that test: go on with the next
    return [seen[key] for key in sorted(seen)]


def policy_test_inputs(cache: pytest.Cache, bundle: PolicyBundle) -> list[dict]:
    key = f"agent-sidecar/opa-parity/policy-test-inputs/v2/{bundle.revision}"
    cached = cache.get(key, None)
    if cached is None:
        cached = collect_policy_test_inputs(bundle.root)
        cache.set(key, cached)
    return cached


# --- 2. the generated corpus -----------------------------------------------------------

NOW = "2026-11-22T10:00:00.123456Z"  # the gate's RFC 3339 form, with microseconds
STRINGS = {
    "path": ["/workspace/notes/a.txt", "/data/public/x.csv", "/etc/passwd", "/workspace/../etc/passwd", "..",
             "/workspace-x/a", "relative/a.txt", "/workspace/a..b", "", "/workspace\\..\\x"],
    "url": ["https://example.org/a", "https://api.github.com/repos/x", "http://example.org/", "https://evil.com/",
            "https://user@example.org/", "https://sub.example.org:8443/x?q=1", "https://a.b.example.org/",
            "ftp://example.org/", "https://EXAMPLE.org/", "", "https://pypi.org"],
    "query": ["select 1", "SELECT * FROM t", "with x as (select 1) select * from x", "delete from t",
              "select 1; drop table t", "select * into t2 from t", "  explain select 1", "", "show tables",
              "Update t set a = 1"],
    "*": ["hello", "ünïcødé ✓ 🚀", "", "a \"quoted\" word", "line\nbreak", "x" * 300, "orders", "<b>"],
}
OTHER_VALUES = [None, 0, 1.5, -7, 10**6, True, False, [], ["a@example.org"], [1, 2], {}, {"k": "v"}]


def _concrete(glob: str, rng: random.Random) -> str:
    parts = []
    for part in glob.split("/"):
        if part == "**":
            parts.append("/".join(rng.choice(["a", "b", "deep"]) for _ in range(rng.randint(1, 3))))
        elif "*" in part:
            parts.append(part.replace("*", rng.choice(["research-agent", "planner", "x", "data-agent"])))
        else:
            parts.append(part)
    return "/".join(parts)


def _identity(spiffe_id: Any, rng: random.Random) -> dict:
    trust_domain = spiffe_id.split("/")[2] if isinstance(spiffe_id, str) and spiffe_id.count("/") >= 2 else ""
    return {
        "spiffe_id": spiffe_id,
        "trust_domain": trust_domain,
        "path": spiffe_id[len("spiffe://") + len(trust_domain) :] if isinstance(spiffe_id, str) else "",
        "source": rng.choice(["workload_api", "mtls", "jwt_svid", "dev"]),
        "svid_expires_at": rng.choice([None, "2026-11-22T12:00:00Z", "2026-11-22T09:00:00Z", NOW,
                                       "2026-11-22T11:00:00+01:00"]),
    }


def _value_of(kind: str, name: str, rng: random.Random) -> Any:
    pool = STRINGS.get(name, STRINGS["*"])
    return {
        "string": lambda: rng.choice(pool),
        "array": lambda: rng.choice([[], ["a@example.org"], ["a", "b"], [1, 2, 3]]),
        "object": lambda: rng.choice([{}, {"k": "v"}]),
        "number": lambda: rng.choice([0, 1, 2.5, -1]),
        "boolean": lambda: rng.choice([True, False]),
    }.get(kind, lambda: rng.choice(pool))()


def _arguments(entry: dict | None, rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.03:
        return rng.choice([None, [], "path=/x", 3])
    declared = entry.get("arguments") if isinstance(entry, dict) else None
    arguments: dict[str, Any] = {}
    for name, kind in (declared or {}).items():
        choice = rng.random()
        if choice < 0.75:
            arguments[name] = _value_of(kind, name, rng)
        elif choice < 0.9:
            arguments[name] = rng.choice(OTHER_VALUES)  # wrong type (sometimes right by luck)
        # else: missing
    for name in ("path", "url", "query"):  # undeclared but policy-relevant arguments
        if rng.random() < 0.08:
            arguments[name] = rng.choice(STRINGS[name])
    if rng.random() < 0.1:
        arguments["extra"] = rng.choice(STRINGS["*"] + OTHER_VALUES)
    return arguments


VALID_STRINGS = {"path": "/workspace/notes/a.txt", "url": "https://example.org/a", "query": "select 1"}
VALID_BY_KIND = {"string": "hello", "array": ["a@example.org"], "object": {"k": "v"}, "number": 1, "boolean": True}


def _valid_arguments(entry: dict | None) -> dict:
    declared = entry.get("arguments") if isinstance(entry, dict) else None
    return {
        name: VALID_STRINGS.get(name, VALID_BY_KIND.get(kind, "hello")) if kind == "string" else VALID_BY_KIND.get(kind, "x")
        for name, kind in (declared or {}).items()
    }


def _granted_for(tool: Any, grants: list, rng: random.Random) -> str | None:
    matching = [
        g["spiffe_id"]
        for g in grants
        if isinstance(g, dict) and isinstance(g.get("spiffe_id"), str) and isinstance(g.get("tools"), list)
        and (tool in g["tools"] or "*" in g["tools"])
    ]
    return _concrete(rng.choice(matching), rng) if matching else None


def generated_corpus(bundle: PolicyBundle, size: int = CORPUS_SIZE, seed: int = SEED) -> list[tuple[dict, bool]]:
    """Valid calls by granted callers, each with 0-3 random mutations (a third are left valid).

    Each document comes with whether it is inside the input contract (see mutate).
    """
    rng = random.Random(seed)
    sidecar_data = bundle.data.get("sidecar", {})
    catalog = (sidecar_data.get("catalog") or {}).get("tools") or {}
    grants = sidecar_data.get("grants") or []
    tool_names = sorted(catalog) or ["search_docs"]
    outsiders = ["spiffe://other.org/ns/agents/sa/research-agent", "spiffe://example.org/ns/humans/sa/alice"]

    def some_id() -> str:
        return _granted_for(rng.choice(tool_names), grants, rng) or rng.choice(outsiders)

    def mutate(document: dict) -> bool:
        """Change one dimension; False when the result is outside the input contract.

        In contract: what the sidecar can send — agent-controlled tool names,
        servers, argument values, signals and task; verified identities from any
        trust domain with RFC 3339 expiries; approvals from the store; usage
        counts. Outside: shapes and values the sidecar never produces (the
        policy must still deny them, but may fail closed doing so).
        """
        tool = document["tool"]
        what = rng.choice(["tool", "server", "arguments", "argument", "subject", "svid", "delegation", "approval",
                           "signals", "usage", "version", "time"])
        if what == "tool":
            if rng.random() < 0.8:
                tool["name"] = rng.choice(tool_names + ["unknown_tool", "ünï_tool"])
            else:
                tool["name"] = rng.choice([None, 7])
            tool["catalog"] = catalog.get(tool["name"]) if isinstance(tool["name"], str) else None
            if rng.random() < 0.5:
                tool["arguments"] = _valid_arguments(tool["catalog"])
            return isinstance(tool["name"], str)
        if what == "server":
            entry = tool["catalog"] or {}
            tool["server"] = rng.choice([entry.get("server", ""), "other-server", "", None])
            return tool["server"] is not None
        if what == "arguments":
            tool["arguments"] = _arguments(tool["catalog"], rng)
            return isinstance(tool["arguments"], dict)
        if what == "argument":
            if isinstance(tool["arguments"], dict):
                name = rng.choice(sorted(tool["arguments"]) + ["path", "url", "query"])
                tool["arguments"][name] = rng.choice(STRINGS.get(name, STRINGS["*"]) + OTHER_VALUES)
            return True
        if what == "subject":
            if rng.random() < 0.9:
                document["subject"] = _identity(rng.choice([some_id(), *outsiders]), rng)
                return True
            document["subject"] = rng.choice([None, _identity(None, rng), _identity(42, rng)])
            return False
        if what == "svid":
            if rng.random() < 0.8:
                document["subject"]["svid_expires_at"] = rng.choice(
                    ["2026-11-22T09:00:00Z", NOW, "2026-11-22T11:00:00+01:00", "2026-11-22T10:30:00+01:00"]
                )
                return True
            document["subject"]["svid_expires_at"] = rng.choice(["not-a-time", "2026-13-01T00:00:00Z", 5])
            return False
        if what == "delegation":
            if rng.random() < 0.8:
                document["delegation"] = [_identity(rng.choice([some_id(), some_id(), *outsiders]), rng)
                                          for _ in range(rng.randint(1, 5))]
                return True
            document["delegation"] = rng.choice([None, "planner", [{"spiffe_id": 5}], [{}]])
            return False
        if what == "approval":
            if rng.random() < 0.7:
                document["approval"] = {"escalation_id": "esc-1", "approver": "spiffe://example.org/ns/humans/sa/alice",
                                        "approved_at": NOW}
                return True
            document["approval"] = rng.choice([{"escalation_id": "", "approver": "bob", "approved_at": NOW},
                                               {"escalation_id": "esc-2", "approver": None, "approved_at": NOW}])
            return False
        if what == "signals":
            document["signals"]["risk_score"] = rng.choice([0, 0.5, 0.7, 0.70001, 0.71, 0.99, 1, "high", True, None])
            if rng.random() < 0.2:
                document["signals"]["extra"] = rng.choice(OTHER_VALUES + STRINGS["*"])
            return True
        if what == "usage":
            if rng.random() < 0.8:
                document["usage"] = {"calls_in_window": rng.choice([59, 60, 61, 1000]), "window_seconds": rng.choice([60, 1]),
                                     "calls_in_task": rng.choice([1, 500, 501, 10_000])}
                return True
            document["usage"] = rng.choice([None, {"calls_in_window": "many"}])
            return False
        if what == "version":
            document["version"] = rng.choice(["sidecar/v2", None, 1, "SIDECAR/V1"])
            return False
        if rng.random() < 0.6:
            document["request"]["time"] = rng.choice(["2026-11-22T10:00:00Z", "2027-01-01T00:00:00.5Z", NOW])
            return True
        document["request"]["time"] = rng.choice([None, "yesterday"])
        return False

    corpus = []
    for _ in range(size):
        name = rng.choice(tool_names)
        entry = catalog.get(name)
        subject = _identity(_granted_for(name, grants, rng) or rng.choice(outsiders), rng)
        subject["svid_expires_at"] = rng.choice([None, "2026-11-22T12:00:00Z"])
        document = {
            "version": "sidecar/v1",
            "subject": subject,
            "delegation": [],
            "tool": {
                "name": name,
                "server": rng.choice(["", (entry or {}).get("server", "")]),
                "arguments": _valid_arguments(entry),
                "catalog": entry,
            },
            "task": {"id": f"t-{rng.randint(1, 5)}", "intent": rng.choice(["", "summarise", "ünïcødé ✓"])},
            "signals": {"risk_score": rng.choice([0, 0.1, 0.5]), "model": rng.choice(["test-model", "ünï-model"])},
            "approval": None,
            "usage": {"calls_in_window": rng.choice([1, 2, 30]), "window_seconds": 60, "calls_in_task": rng.choice([1, 10])},
            "request": {"call_id": f"c-{rng.randint(1, 10**6)}", "time": NOW, "sidecar": "parity"},
        }
        in_contract = True
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            in_contract = mutate(document) and in_contract
        corpus.append((document, in_contract))
    return corpus


# --- the two engines ------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engines():
    bundle = load_bundle(REGO)
    embedded = EmbeddedEngine(REGO, reload=False, timeout_ms=2000, run_bundle_tests=False)
    await embedded.start()
    double = None
    url = REAL_OPA
    if not url:
        double = await OpaTestServer(REGO).start()
        url = double.url
    # Each input is judged on its own: no retries, and a breaker that never opens.
    opa = OpaEngine(REGO, url=url, timeout_ms=2000, reload=False, retries=0, breaker_failures=10**9)
    await opa.start()
    yield bundle, embedded, opa
    await opa.close()
    await embedded.close()
    if double is not None:
        await double.close()


async def decide_all(engine, documents: list[dict]) -> list:
    # One at a time: regopy holds the GIL, so concurrency only adds contention here.
    return [await engine.evaluate(document) for document in documents]


async def assert_parity(embedded, opa, documents: list[dict], *, may_fail_closed: bool) -> list:
    """Identical (outcome, reasons, obligations); an engine error fails parity unless `may_fail_closed`,
    where both engines failing closed (a deny with an engine error on each side) also counts as parity."""
    assert documents
    local, remote = await decide_all(embedded, documents), await decide_all(opa, documents)
    problems = []
    for document, a, b in zip(documents, local, remote):
        if a.error or b.error:
            if may_fail_closed and a.error and b.error and a.outcome == b.outcome == "deny":
                continue
            problems.append(f"engine error: embedded={a.error!r} opa={b.error!r}\n  input={json.dumps(document)}")
        elif (a.outcome, a.reasons, a.obligations) != (b.outcome, b.reasons, b.obligations):
            problems.append(
                f"decisions differ:\n  embedded={(a.outcome, a.reasons, a.obligations)}\n"
                f"  opa     ={(b.outcome, b.reasons, b.obligations)}\n  input={json.dumps(document)}"
            )
    assert not problems, f"{len(problems)} of {len(documents)} inputs break parity; first 3:\n" + "\n".join(problems[:3])
    return local


@pytest.mark.asyncio(loop_scope="module")
async def test_parity_on_every_input_of_the_policy_tests(engines, request):
    bundle, embedded, opa = engines
    if not bundle.tests:
        pytest.skip("rego/ has no *_test.rego yet")
    documents = policy_test_inputs(request.config.cache, bundle)
    assert len(documents) >= len(bundle.tests), "the policy tests evaluated fewer inputs than there are test files"
    # The policy tests feed deliberately broken inputs too: failing closed on both sides is parity there.
    await assert_parity(embedded, opa, documents, may_fail_closed=True)


@pytest.mark.asyncio(loop_scope="module")
async def test_parity_on_a_generated_corpus_inside_the_input_contract(engines):
    bundle, embedded, opa = engines
    corpus = [document for document, in_contract in generated_corpus(bundle) if in_contract]
    assert len(corpus) > CORPUS_SIZE // 2
    # What the sidecar can really send must be decided by policy, never by an engine error.
    decisions = await assert_parity(embedded, opa, corpus, may_fail_closed=False)
    assert {d.outcome for d in decisions} == {"allow", "deny", "escalate"}, "the corpus must reach every outcome"


@pytest.mark.asyncio(loop_scope="module")
async def test_parity_on_a_generated_corpus_outside_the_input_contract(engines):
    bundle, embedded, opa = engines
    corpus = [document for document, in_contract in generated_corpus(bundle) if not in_contract]
    assert corpus
    for decision in await assert_parity(embedded, opa, corpus, may_fail_closed=True):
        assert decision.outcome == "deny" or not decision.error


def test_the_corpus_is_reproducible():
    bundle = load_bundle(REGO)
    assert generated_corpus(bundle, 20) == generated_corpus(bundle, 20)
    assert generated_corpus(bundle, 20) != generated_corpus(bundle, 20, seed=SEED + 1)
