# The combinator in isolation (the reason sets replaced with `with`), then end
# to end on the shipped data.
package sidecar.tests

combine(denials, escalations, allowances, appr) := d if {
	d := decide(mk({"approval": appr}))
		with data.sidecar.deny as denials
		with data.sidecar.escalate as escalations
		with data.sidecar.allow as allowances
}

test_deny_beats_escalate_and_allow if {
	d := combine({"b_code: b", "a_code: a"}, {"e: x"}, {"granted: x"}, null)
	d.outcome == "deny"
	d.reasons == ["a_code: a", "b_code: b"]
}

test_escalate_beats_allow_without_approval if {
	d := combine(set(), {"z: z", "y: y"}, {"granted: x"}, null)
	d.outcome == "escalate"
	d.reasons == ["y: y", "z: z"]
}

test_approval_satisfies_escalate if {
	d := combine(set(), {"y: y"}, {"granted: x"}, approval)
	d.outcome == "allow"
	d.reasons == ["approved: escalation esc-1 approved by spiffe://example.org/ns/humans/sa/alice", "granted: x"]
}

test_approval_never_satisfies_deny if {
	d := combine({"d: no"}, {"y: y"}, {"granted: x"}, approval)
	d.outcome == "deny"
	d.reasons == ["d: no"]
}

test_approval_without_escalation_adds_no_reason if {
	d := combine(set(), set(), {"granted: x"}, approval)
	d.outcome == "allow"
	d.reasons == ["granted: x"]
}

test_malformed_approval_does_not_satisfy_escalate if {
	every appr in [{}, {"escalation_id": "", "approver": "a"}, {"escalation_id": "e", "approver": 5}, "yes", true] {
		combine(set(), {"y: y"}, {"granted: x"}, appr).outcome == "escalate"
	}
}

test_nothing_allows_means_deny if {
	d := combine(set(), set(), set(), null)
	d.outcome == "deny"
	d.reasons == ["no rule allows this call"]
}

test_approved_escalation_without_allow_is_denied if {
	d := combine(set(), {"y: y"}, set(), approval)
	d.outcome == "deny"
	d.reasons == ["no rule allows this call"]
}

test_allow_reasons_sorted if {
	combine(set(), set(), {"b: 2", "a: 1"}, null).reasons == ["a: 1", "b: 2"]
}

sample_inputs := [
	base_input,
	{},
	mk({"version": "x"}),
	mk({"approval": approval}),
	mk({"signals": {"risk_score": 0.99}}),
	mk({"signals": {"risk_score": 0.99}, "approval": approval}),
	call("rm_rf", {}),
	call("read_file", {"path": "/workspace/../x"}),
	call_as(ops_agent, "send_email", {"to": ["a@example.org"], "subject": "s", "body": "b"}),
	call_as(outsider, "search_docs", {"query": "q"}),
	call_as(dev_agent, "delete_records", {"table": "t", "ids": [1]}),
	mk({"tool": {"name": "read_file"}}),
]

test_every_decision_has_an_outcome_and_reasons if {
	every inp in sample_inputs {
		d := decide(inp)
		d.outcome in {"allow", "deny", "escalate"}
		is_array(d.reasons)
		count(d.reasons) > 0
		every r in d.reasons {
			is_string(r)
			r != ""
		}
		is_object(d.obligations)
	}
}

test_every_reason_has_a_snake_case_code if {
	every inp in sample_inputs {
		every r in decide(inp).reasons {
			reason_well_formed(r)
		}
	}
}

reason_well_formed("no rule allows this call")

reason_well_formed(r) if regex.match(`^[a-z][a-z0-9_]*: .+`, r)

# End to end: a high-risk call escalates, and its approved retry is allowed.
email := call_as(ops_agent, "send_email", {"to": ["a@example.org"], "subject": "s", "body": "b"})

test_high_risk_call_escalates_then_approved_retry_allowed if {
	first := decide(email)
	first.outcome == "escalate"
	first.reasons == [
		"high_risk_tool: tool \"send_email\" has risk high",
		"irreversible_tool: tool \"send_email\" cannot be undone",
	]
	retry := decide(object.union(email, {"approval": approval}))
	retry.outcome == "allow"
	retry.reasons == [
		"approved: escalation esc-1 approved by spiffe://example.org/ns/humans/sa/alice",
		sprintf("granted: %v is granted tool \"send_email\"", [ops_agent]),
	]
}

test_deny_and_escalate_together_deny if {
	d := decide(object.union(email, {"usage": {"calls_in_window": 100, "window_seconds": 60, "calls_in_task": 1}}))
	d.outcome == "deny"
	d.reasons == ["rate_limited: 100 calls in the last 60s, over the limit of 60"]
}
