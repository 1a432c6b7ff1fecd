# Signals from the agent's model: a risk score above the threshold escalates.
# A risk_score that is missing or not a number does not match.
package sidecar

escalate contains reason([
	"risk_score_over_threshold: risk score ", score,
	" is over the threshold ", show(limit("risk_score_threshold")),
]) if {
	score := input.signals.risk_score
	is_number(score)
	score > limit("risk_score_threshold")
}
