package sidecar.tests

usage(window, task) := {"usage": {"calls_in_window": window, "window_seconds": 60, "calls_in_task": task}}

test_calls_over_window_limit_denied if {
	inp := mk(usage(61, 61))
	denies(inp, "rate_limited")
	d := decide(inp)
	d.outcome == "deny"
	"rate_limited: 61 calls in the last 60s, over the limit of 60" in d.reasons
}

test_calls_at_window_limit_not_denied if {
	not denies(mk(usage(60, 60)), "rate_limited")
}

test_rate_limit_not_lifted_by_approval if {
	d := decide(mk(object.union(usage(61, 61), {"approval": approval})))
	d.outcome == "deny"
	"rate_limited" in codes(d.reasons)
}

test_rate_limit_default_when_setting_missing if {
	denies(mk(usage(61, 1)), "rate_limited") with data.sidecar.limits as {}
	not denies(mk(usage(60, 1)), "rate_limited") with data.sidecar.limits as {}
}

test_usage_not_numbers_ignored if {
	inp := mk({"usage": {"calls_in_window": "many", "calls_in_task": null}})
	not denies(inp, "rate_limited")
	not escalates(inp, "task_call_budget_exceeded")
	decide(inp).outcome == "allow"
}

test_task_over_budget_escalates if {
	inp := mk(usage(1, 501))
	escalates(inp, "task_call_budget_exceeded")
	decide(inp).outcome == "escalate"
}

test_task_at_budget_not_escalated if {
	not escalates(mk(usage(1, 500)), "task_call_budget_exceeded")
}
