# Rego as OPA evaluates it, pinned where the old embedded interpreter
# (regopy 1.5.2) decided otherwise and let calls through: strings with
# U+0000, float precision, integers past 64 bits, and `not` over a call on
# an undefined reference. Each test is an input that the old engine allowed
# or failed to escalate.
package sidecar.tests

# The whole string reaches the rules: the interpreter cut it at U+0000 and
# saw "/workspace/a", an allowed path.
test_nul_in_a_string_does_not_cut_it if {
	inp := call("read_file", {"path": "/workspace/a\u0000/../../etc/shadow"})
	denies(inp, "path_traversal")
	decide(inp).outcome == "deny"
	count("a\u0000b") == 3
	data.sidecar.show("a\u0000b") == "a?b"
}

test_nul_in_a_tool_name_is_another_tool if {
	denies(call("read_file\u0000x", {"path": "/workspace/a"}), "tool_not_in_catalog")
}

# 0.7000001 is over 0.7: the interpreter rounded it to 0.7 and skipped the
# escalation.
test_risk_score_just_over_the_threshold_escalates if {
	inp := mk({"signals": {"risk_score": 0.7000001}})
	escalates(inp, "risk_score_over_threshold")
	decide(inp).outcome == "escalate"
	not escalates(mk({"signals": {"risk_score": 0.7}}), "risk_score_over_threshold")
	escalates(mk({"signals": {"risk_score": 0.70000000000001}}), "risk_score_over_threshold")
}

# Integers are exact however large: no wrap at 2^64, no rounding past 2^53.
test_big_integers_are_exact if {
	denies(mk({"usage": {"calls_in_window": 18446744073709551617, "window_seconds": 60, "calls_in_task": 1}}), "rate_limited")
	escalates(mk({"usage": {"calls_in_window": 1, "window_seconds": 60, "calls_in_task": 9223372036854775808}}), "task_call_budget_exceeded")
	9007199254740993 > 9007199254740992
	inp := mk({"usage": {"calls_in_window": 9007199254740993, "window_seconds": 60, "calls_in_task": 1}})
	denies(inp, "rate_limited") with data.sidecar.limits.max_calls_in_window as 9007199254740992
	not denies(inp, "rate_limited") with data.sidecar.limits.max_calls_in_window as 9007199254740993
}

# The undefined-reference trap (docs/policy-authoring.md): `not f(ref)` with
# `ref` undefined is undefined in OPA, so a rule written that way never
# fires. The interpreter made it true, hiding the bug.
naive_missing_id if not is_string(input.subject.spiffe_id)

subject_id_is_string if is_string(input.subject.spiffe_id)

helper_missing_id if not subject_id_is_string

test_not_over_an_undefined_reference if {
	not naive_missing_id with input as {"subject": {}}
	helper_missing_id with input as {"subject": {}}
	naive_missing_id with input as {"subject": {"spiffe_id": 5}}
	not helper_missing_id with input as base_input
}

# The shipped rules use helper rules, so each fires when its reference is
# undefined.
test_rules_fire_when_their_reference_is_undefined if {
	denies(mk({"subject": {}}), "not_granted")
	denies(object.remove(base_input, ["subject"]), "not_granted")
	denies(call("rm_rf", {}), "tool_not_in_catalog")
	denies(object.remove(base_input, ["tool"]), "tool_not_in_catalog")
	denies(mk({"delegation": [{"source": "jwt_svid"}]}), "invalid_delegation")
	denies(call("read_file", {}), "path_not_allowed")
	denies(call("http_get", {}), "url_not_allowed")
	denies(object.remove(base_input, ["version"]), "unsupported_input_version")
	escalates(call_as(data_agent, "run_sql", {"query": "select 1"}), "sql_unparsed")
}
