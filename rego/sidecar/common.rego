# Helpers shared by the rule files. Nothing here adds a reason by itself.
#
# A note on `not` (docs/policy-authoring.md, "The undefined-reference trap"):
# OPA evaluates `not f(x)` with `x` undefined as undefined, so the rule
# around it does not fire. Every negation in this bundle is over a helper
# rule whose own body reads the possibly-missing value (`not tool_known`,
# `tool_known if is_object(tool_entry)`), never over a call on such a value.
package sidecar

# The tool's entry in this bundle's catalog (data.sidecar.catalog.tools),
# undefined when the tool is not in the catalog. The rules read the catalog
# from the bundle, not from input.tool.catalog: what the sidecar copied into
# the input is for people and logs, this bundle is what decides.
tool_entry := data.sidecar.catalog.tools[input.tool.name]

tool_known if is_object(tool_entry)

# Printable names for reason strings; never undefined, so a reason is never
# lost because the input is odd.
tool_label := show(input.tool.name) if is_string(input.tool.name)

else := "<missing>"

caller_label := show(input.subject.spiffe_id) if is_string(input.subject.spiffe_id)

else := "<missing>"

# Agents upstream of the caller, outermost first; [] when absent or not a list
# (delegation.rego denies a delegation that is neither a list nor null).
delegation_links := input.delegation if is_array(input.delegation)

else := []

# The caller followed by its delegation chain (identity objects only).
identities := array.concat(subject_list, delegation_links)

subject_list := [input.subject] if is_object(input.subject)

else := []

# Settings from data.sidecar.limits, falling back to these defaults when a key
# is missing, so deleting a setting never silently switches a rule off.
default_limits := {
	"risk_score_threshold": 0.7,
	"max_calls_in_window": 60,
	"max_calls_in_task": 500,
	"max_delegation_depth": 3,
	"path_prefixes": {},
	"url_hosts": {},
	"sql_read_only_statements": ["select", "explain", "show"],
	"sql_functions": [],
	"sql_operators": [],
}

limit(key) := value if {
	value := data.sidecar.limits[key]
} else := default_limits[key]

# Reason text from parts: the literal text of the rule, and values wrapped in
# show(). Non-string parts go through show() by themselves.
#
# Reasons are read by people (denials, approvals, evidence) and go into span
# attributes and metrics, so every value that comes from the input or data
# goes through show(): it keeps letters, digits, space and ._:/@+=,*~()[]-
# and turns anything else (quotes, control and invisible characters) into
# "?". A reason then never carries text that could pass for another field.
#
# Most reasons are all text already (labels, literal text, show()n values):
# those are joined as they are; text() per part is only for the others.
reason(parts) := concat("", parts) if {
	[part | some part in parts; not is_string(part)] == []
} else := concat("", [text(part) | some part in parts])

text(x) := x if is_string(x)

else := show(x)

#
# Most values are plain already (SPIFFE IDs, tool names): trim() with the
# kept characters as its cut set strips the whole of such a string, and
# show() then returns it as it is, which is what the regex would give, at a
# fraction of the cost. show_kept must list exactly the characters of the
# regex's class (hostile_test.rego checks that they agree).
show(x) := x if {
	is_string(x)
	trim(x, show_kept) == ""
} else := regex.replace(x, show_replaced, "?") if {
	is_string(x)
} else := regex.replace(sprintf("%v", [x]), show_replaced, "?")

show_kept := "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 ._:/@+=,*~()[]-"

show_replaced := `[^A-Za-z0-9 ._:/@+=,*~()\[\]-]`

# Comma-separated text of a list, whatever its members are.
list_text(xs) := concat(", ", [show(x) | some x in xs]) if is_array(xs)

else := show(xs)

# True when xs is a list of strings (safe to hand to string built-ins).
# (A comprehension of the members that are not strings costs less than
# `every`, and says the same.)
strings_list(xs) if {
	is_array(xs)
	[x | some x in xs; not is_string(x)] == []
}

# RFC 3339 text to nanoseconds since the epoch; undefined unless s is an RFC
# 3339 date-time of a real calendar day. Checked before parsing so that odd
# text is "no time" under strict built-in errors too (where a failing
# built-in would fail the whole decision).
#
# The calendar is in the pattern, which is cheaper than computing it: the
# month-day part admits days 01-28 of every month, the 29th and 30th of
# every month but February, the 31st of the seven months that have one, and
# February 29th, which the second body admits in leap years only.
rfc3339_pattern := `^[0-9]{4}-((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2])-(29|30)|(0[13578]|1[02])-31|02-29)T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$`

time_ns(s) := time.parse_rfc3339_ns(s) if {
	rfc3339_on_opas_clock(s)
	substring(s, 5, 5) != "02-29"
} else := time.parse_rfc3339_ns(s) if {
	rfc3339_on_opas_clock(s)
	leap_year(to_number(substring(s, 0, 4)))
}

# OPA counts time in nanoseconds since 1970 in 64 bits, from 1677-09-21 to
# 2262-04-11, and fails to parse a time outside (which fails the decision
# under strict built-in errors). Years 1678 to 2261 are inside whatever the
# offset; a time of another year is "before" or "after" OPA's clock instead.
# X.509 certificates say "no expiry" with 9999-12-31T23:59:59Z (RFC 5280,
# section 4.1.2.5), which is such a time.
rfc3339_on_opas_clock(s) if {
	rfc3339_year(s) >= 1678
	rfc3339_year(s) <= 2261
}

before_opas_clock(s) if rfc3339_year(s) < 1678

rfc3339_year(s) := to_number(substring(s, 0, 4)) if {
	is_string(s)
	regex.match(rfc3339_pattern, s)
}

leap_year(y) if {
	y % 4 == 0
	y % 100 != 0
}

leap_year(y) if y % 400 == 0

# True when the call carries a usable human approval: escalation_id and
# approver are non-empty strings. An approval satisfies escalate rules, never
# deny rules (see decision.rego).
approved if {
	is_string(input.approval.escalation_id)
	input.approval.escalation_id != ""
	is_string(input.approval.approver)
	input.approval.approver != ""
}
