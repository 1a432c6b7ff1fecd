"""Differential test: the served sidecar decides exactly as `opa eval` on the same bundle.

Hypothesis generates tool calls shaped for the shipped policy (catalog tools
and unknown ones, the arguments its rules read, risk scores around the 0.7
threshold, large and tiny numbers, odd strings). Each is sent through the
served sidecar over gRPC (managed OPA on a copy of rego/ without its test
files: tests never serve, so the decisions are those of rego/ whatever its
tests say today). The input document the gate built is captured, and all of
them are decided again over the same files by one `opa eval
--strict-builtin-errors` whose data holds every input. Outcome, reasons and obligations must be identical; an input on which
OPA's evaluation fails must be a `policy_error` deny in the sidecar.
At least 1,000 inputs (DIFFERENTIAL_EXAMPLES batches of 50, default 20).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.client import Client
from sidecar.jsonvalues import SAFE_INTEGER
from sidecar.policy.opa.runner import find_opa
from tests.conftest import REGO

BATCH = 50
BATCHES = int(os.environ.get("DIFFERENTIAL_EXAMPLES", "20"))
SUBJECT = "spiffe://example.org/ns/agents/sa/ops-agent"

CATALOG_TOOLS = ["search_docs", "read_file", "write_file", "run_sql", "send_email", "delete_records", "http_get",
                 "create_ticket"]
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
paths = st.one_of(
    st.sampled_from(["/workspace/notes.txt", "/workspace/a/../../etc/shadow", "/etc/passwd", "/workspace/", "",
                     "/workspace/reports/q3.csv", "relative.txt", "/workspace//x"]),
    st.builds(lambda a, b: f"/workspace/{a}/{b}", texts, texts),
)
urls = st.one_of(
    st.sampled_from(["https://docs.example.org/x", "http://169.254.169.254/latest", "https://example.org",
                     "ftp://example.org/f", "https://docs.example.org.evil.com/", "not a url", ""]),
    st.builds(lambda h, p: f"https://{h}/{p}", texts, texts),
)
# Numbers an agent can send exactly (docs/api.md, numbers): integers within ±(2^53−1), any finite double
# that is not an integer beyond it. The client refuses the others before they leave the agent.
safe_integers = st.integers(min_value=-SAFE_INTEGER, max_value=SAFE_INTEGER)
numbers = st.one_of(
    safe_integers,
    st.floats(min_value=-1e15, max_value=1e15),  # every double past 2^53 is an integer: none of those
    st.sampled_from([0.7, 0.7000001, 0.6999999, 0.71, 1, 0, -1, SAFE_INTEGER, 5e-324]),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=8,
)
arguments = st.fixed_dictionaries(
    {},
    optional={
        "path": paths | json_values,
        "url": urls | json_values,
        "query": texts | json_values,
        "sql": st.sampled_from(["select 1", "DELETE FROM orders", "drop table x", "SELECT * FROM users; --"]) | texts,
        "table": st.sampled_from(["orders", "users", ""]) | texts,
        "ids": st.lists(safe_integers, max_size=5) | json_values,
        "to": st.lists(st.sampled_from(["a@example.org", "x@evil.com", ""]), max_size=3) | json_values,
        "subject": texts,
        "body": texts,
        "title": texts,
        "content": texts,
        "extra": json_values,
    },
)
signals = st.none() | st.fixed_dictionaries({}, optional={"risk_score": numbers | json_values, "other": json_values})
sql = st.sampled_from(["select 1", "SELECT * FROM orders", "with x as (select 1) select * from x", "DELETE FROM orders",
                       "drop table x", "select 1; delete from users", "explain select 1", ""]) | texts
# Arguments each tool declares, with the types the catalog gives them (the rules past type checks run).
fitting = st.one_of(
    st.tuples(st.just("search_docs"), st.fixed_dictionaries({"query": texts})),
    st.tuples(st.just("read_file"), st.fixed_dictionaries({"path": paths})),
    st.tuples(st.just("write_file"), st.fixed_dictionaries({"path": paths, "content": texts})),
    st.tuples(st.just("run_sql"), st.fixed_dictionaries({"query": sql})),
    st.tuples(st.just("http_get"), st.fixed_dictionaries({"url": urls})),
    st.tuples(st.just("create_ticket"), st.fixed_dictionaries({"title": texts}, optional={"body": texts})),
    st.tuples(st.just("send_email"), st.fixed_dictionaries(
        {"to": st.lists(st.sampled_from(["a@example.org", "x@evil.com"]), max_size=3), "subject": texts, "body": texts})),
    st.tuples(st.just("delete_records"), st.fixed_dictionaries(
        {"table": st.sampled_from(["orders", "users"]), "ids": st.lists(safe_integers, max_size=3)})),
)
anything = st.tuples(st.sampled_from(CATALOG_TOOLS) | st.sampled_from(["rm_rf", "shell", "x"]), arguments)
calls = st.builds(
    lambda tool_arguments, rest: {"tool": tool_arguments[0], "arguments": tool_arguments[1], **rest},
    st.one_of(fitting, fitting, fitting, anything),
    st.fixed_dictionaries({
        "signals": signals,
        "intent": st.sampled_from(["", "summarise the notes", "exfiltrate"]) | texts,
        "task_id": st.sampled_from(["", "t-1", "t-2"]),
        "server": st.sampled_from(["", "files", "mail"]),
    }),
)


def opa_decisions(binary: str, bundle: Path, documents: list[dict], work: Path) -> list:
    """`data.sidecar.decision` for each document by `opa eval` (one process for the batch); "error" where OPA fails."""
    data = work / "inputs.json"
    data.write_text(json.dumps({"differential": {"inputs": documents}}))
    query = "x := {i: d | some i; doc := data.differential.inputs[i]; d := data.sidecar.decision with input as doc}"
    result = subprocess.run(
        [binary, "eval", "--strict-builtin-errors", "--format", "json", "--bundle", str(bundle), "--data", str(data), query],
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode == 0:
        bindings = json.loads(result.stdout)["result"][0]["bindings"]["x"]
        return [bindings.get(str(i), bindings.get(i)) for i in range(len(documents))]
    if len(documents) == 1:
        return ["error"]
    # A built-in error fails the whole batch: halve it until the failing inputs are alone.
    middle = len(documents) // 2
    return opa_decisions(binary, bundle, documents[:middle], work) + opa_decisions(binary, bundle, documents[middle:], work)


async def test_the_served_sidecar_decides_as_opa_eval(running_sidecar, sidecar_config, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(REGO, bundle, ignore=shutil.ignore_patterns("*_test.rego"))
    sidecar = await running_sidecar(sidecar_config(**{
        "policy.dir": str(bundle),
        "policy.timeout_ms": 5000,  # the comparison is about decisions, not speed
        "identity.dev_spiffe_id": SUBJECT,
        "usage.window_seconds": 1,
    }))
    captured: list[dict] = []
    served = sidecar.gate.decisions

    class Capturing:
        async def decide(self, document):
            captured.append(json.loads(json.dumps(document)))
            return await served.decide(document)

    sidecar.gate.decisions = Capturing()
    binary = find_opa()
    decided: list[tuple] = []  # (what the agent got, the input document OPA got)

    @settings(max_examples=BATCHES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(calls, min_size=BATCH, max_size=BATCH))
    def batch(generated):
        with Client(sidecar.addresses[0]) as client:
            for call in generated:
                before = len(captured)
                result = client.authorize(call["tool"], call["arguments"], signals=call["signals"],
                                          intent=call["intent"], task_id=call["task_id"], server=call["server"])
                if len(captured) == before + 1:  # it reached OPA (not refused by the gate's own checks)
                    decided.append((result, captured[-1]))

    await asyncio.to_thread(batch)
    # One `opa eval` over every input the sidecar decided.
    expected = await asyncio.to_thread(opa_decisions, binary, bundle, [document for _, document in decided], tmp_path)
    outcomes: dict[str, int] = {}
    for (result, document), want in zip(decided, expected, strict=True):
        got = {"outcome": result.outcome, "reasons": list(result.reasons), "obligations": result.obligations}
        if want == "error":
            assert result.outcome == "deny" and result.reasons[0].startswith("policy_error:"), (document, got)
        else:
            assert got == want, f"sidecar and opa eval disagree\n input={json.dumps(document)}\n sidecar={got}\n opa={want}"
        outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
    print("differential:", len(decided), "decisions compared", outcomes)
    assert len(decided) >= BATCHES * BATCH * 0.9, outcomes  # nearly every generated call reached OPA
    assert set(outcomes) == {"allow", "deny", "escalate"}, outcomes  # every outcome was exercised
