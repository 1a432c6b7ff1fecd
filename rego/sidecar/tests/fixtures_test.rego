# Shared fixtures for the policy tests: a base input document (an allowed
# read_file call by the research agent) and helpers that patch it.
#
# mk(patch) replaces whole top-level keys of base_input (it does not deep-merge,
# so a test always sees exactly the sub-document it wrote).
package sidecar.tests

research := "spiffe://example.org/ns/agents/sa/research-agent"

data_agent := "spiffe://example.org/ns/agents/sa/data-agent"

ops_agent := "spiffe://example.org/ns/agents/sa/ops-agent"

orchestrator := "spiffe://example.org/ns/orchestrators/sa/planner"

dev_agent := "spiffe://dev.local/agent"

outsider := "spiffe://other.org/ns/agents/sa/research-agent"

# An input identity object for a SPIFFE ID, SVID valid until 12:00.
identity(id) := {
	"spiffe_id": id,
	"trust_domain": split(id, "/")[2],
	"path": trim_prefix(id, concat("", ["spiffe://", split(id, "/")[2]])),
	"source": "workload_api",
	"svid_expires_at": "2026-11-22T12:00:00Z",
}

# An input tool object, with the catalog entry and the parsed-argument facts
# the sidecar would attach.
tool(name, args) := {
	"name": name,
	"server": "",
	"arguments": args,
	"catalog": object.get(data.sidecar.catalog.tools, name, null),
	"facts": facts_for(name, args),
}

# The facts the sidecar's parsers give for the arguments the catalog entry
# formats as path or url: looked up in facts/data.json (data.sidecar.tests.facts),
# which tests/test_policy_facts_fixture.py keeps equal to the parsers' output.
# SQL facts are written out in arguments_test.rego.
facts_for(name, args) := {arg: facts |
	some arg, format in object.get(object.get(data.sidecar.catalog.tools, name, {}), "formats", {})
	facts := data.sidecar.tests.facts[format][args[arg]]
}

# The dev identity, as the sidecar makes it in dev mode.
dev_identity(id) := object.union(identity(id), {"source": "dev", "svid_expires_at": null})

base_input := {
	"version": "sidecar/v1",
	"subject": identity(research),
	"delegation": [],
	"tool": tool("read_file", {"path": "/workspace/notes/a.txt"}),
	"task": {"id": "t-1", "intent": "summarise the notes"},
	"signals": {"risk_score": 0.1, "model": "test-model"},
	"approval": null,
	"usage": {"calls_in_window": 1, "window_seconds": 60, "calls_in_task": 1},
	"request": {"call_id": "c-1", "time": "2026-11-22T10:00:00Z", "sidecar": "test"},
}

approval := {
	"escalation_id": "esc-1",
	"approver": "spiffe://example.org/ns/humans/sa/alice",
	"approved_at": "2026-11-22T10:05:00Z",
}

# base_input with the given top-level keys replaced.
mk(patch) := object.union(object.remove(base_input, object.keys(patch)), patch)

# A call of tool `name` with `args` by the research agent / by `id`.
call(name, args) := mk({"tool": tool(name, args)})

call_as(id, name, args) := mk({"subject": identity(id), "tool": tool(name, args)})

# Evaluate the policy on an input document: the decision and the three sets.
run(inp) := result if {
	result := {
		"decision": data.sidecar.decision,
		"deny": data.sidecar.deny,
		"escalate": data.sidecar.escalate,
		"allow": data.sidecar.allow,
	} with input as inp
}

decide(inp) := run(inp).decision

deny_codes(inp) := codes(run(inp).deny)

escalate_codes(inp) := codes(run(inp).escalate)

allow_codes(inp) := codes(run(inp).allow)

# Does the input make a deny / escalate / allow rule with this code fire?
denies(inp, code) if code in deny_codes(inp)

escalates(inp, code) if code in escalate_codes(inp)

allows(inp, code) if code in allow_codes(inp)

# "code: text" -> "code".
codes(reasons) := {split(r, ":")[0] | some r in reasons}
