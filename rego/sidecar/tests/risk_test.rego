package sidecar.tests

test_risk_score_over_threshold_escalates if {
	inp := mk({"signals": {"risk_score": 0.9}})
	escalates(inp, "risk_score_over_threshold")
	d := decide(inp)
	d.outcome == "escalate"
	d.reasons == ["risk_score_over_threshold: risk score 0.9 is over the threshold 0.7"]
}

test_risk_score_at_threshold_not_escalated if {
	not escalates(mk({"signals": {"risk_score": 0.7}}), "risk_score_over_threshold")
}

test_low_risk_score_not_escalated if {
	not escalates(base_input, "risk_score_over_threshold")
}

test_risk_score_not_a_number_ignored if {
	inp := mk({"signals": {"risk_score": "0.99"}})
	not escalates(inp, "risk_score_over_threshold")
	decide(inp).outcome == "allow"
}

test_missing_signals_ignored if {
	not escalates(mk({"signals": {}}), "risk_score_over_threshold")
	not escalates(object.remove(base_input, ["signals"]), "risk_score_over_threshold")
}

test_risk_threshold_comes_from_data if {
	escalates(mk({"signals": {"risk_score": 0.6}}), "risk_score_over_threshold") with data.sidecar.limits.risk_score_threshold as 0.5
}

test_risk_score_approved_is_allowed if {
	d := decide(mk({"signals": {"risk_score": 0.9}, "approval": approval}))
	d.outcome == "allow"
}
