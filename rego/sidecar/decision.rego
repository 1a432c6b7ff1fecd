# The combinator: the one place that turns the deny / escalate / allow sets
# (partial rules in package sidecar, each member a "<code>: <text>" reason)
# into the decision the sidecar reads at data.sidecar.decision.
#
#   any deny                               -> deny,     reasons = sorted deny
#   else any escalate and no approval      -> escalate, reasons = sorted escalate
#   else any allow                         -> allow,    reasons = sorted allow
#                                             plus "approved: ..." when an
#                                             approval satisfied escalate rules
#   else                                   -> deny,     "no rule allows this call"
#
# Reasons are never empty. obligations is merged in whatever the outcome.
package sidecar

default decision := {
	"outcome": "deny",
	"reasons": ["no rule allows this call"],
	"obligations": {},
}

decision := {"outcome": "deny", "reasons": sort(deny), "obligations": obligations} if {
	count(deny) > 0
} else := {"outcome": "escalate", "reasons": sort(escalate), "obligations": obligations} if {
	count(escalate) > 0
	not approved
} else := {"outcome": "allow", "reasons": sort(allow | approval_reasons), "obligations": obligations} if {
	count(allow) > 0
} else := {"outcome": "deny", "reasons": ["no rule allows this call"], "obligations": obligations}

# Said on an allow when escalate rules fired but an approval satisfied them,
# sorted together with the allow reasons.
approval_reasons contains reason([
	"approved: escalation ", show(input.approval.escalation_id),
	" approved by ", show(input.approval.approver),
]) if {
	approved
	count(escalate) > 0
}
