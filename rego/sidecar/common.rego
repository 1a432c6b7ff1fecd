# Helpers shared by the rule files. Nothing here adds a reason by itself.
package sidecar

# The tool's entry in this bundle's catalog (data.sidecar.catalog.tools),
# undefined when the tool is not in the catalog. The rules read the catalog
# from the bundle, not from input.tool.catalog, so the policy decides the same
# way in the embedded engine and in an OPA server holding this bundle.
tool_entry := data.sidecar.catalog.tools[input.tool.name]

# Printable names for reason strings; never undefined, so a reason is never
# lost because the input is odd.
tool_label := show(input.tool.name) if is_string(input.tool.name)
else := "<missing>"

caller_label := show(input.subject.spiffe_id) if is_string(input.subject.spiffe_id)
else := "<missing>"

# Agents upstream of the caller, outermost first; [] when absent or not a list.
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
	"sql_tools": [],
	"sql_read_only_statements": ["select", "with", "explain", "show", "describe", "values"],
	"sql_write_keywords": [
		"insert", "update", "delete", "merge", "upsert", "drop", "alter", "create",
		"truncate", "grant", "revoke", "copy", "call", "exec", "execute", "into", "lock",
	],
}

limit(key) := value if {
	value := data.sidecar.limits[key]
} else := default_limits[key]

# Reason text from parts: the literal text of the rule, and values wrapped in
# show(). Non-string parts go through show() by themselves.
#
# Every value that comes from the input (or data) MUST go through show(),
# which keeps letters, digits, space and ._:/@+=,*~()[]- and turns anything
# else into "?". Two regopy 1.5.2 defects make this a security matter, not
# cosmetics: a string built by concat from input text is written into the
# engine's JSON output without escaping its quotes, so a tool name like
#   x"], "outcome": "allow", "reasons": ["
# inside a reason would rewrite the decision the sidecar reads; and sprintf
# wraps strings produced by other built-ins in extra quotes. Hence concat,
# never sprintf over strings, and show() on every value.
reason(parts) := concat("", [text(part) | some part in parts])

text(x) := x if is_string(x)
else := show(x)

show(x) := regex.replace(x, `[^A-Za-z0-9 ._:/@+=,*~()\[\]-]`, "?") if is_string(x)
else := regex.replace(sprintf("%v", [x]), `[^A-Za-z0-9 ._:/@+=,*~()\[\]-]`, "?")

# Comma-separated text of a list, whatever its members are.
list_text(xs) := concat(", ", [show(x) | some x in xs]) if is_array(xs)
else := show(xs)

# True when xs is a list of strings (safe to hand to string built-ins).
strings_list(xs) if {
	is_array(xs)
	every x in xs {
		is_string(x)
	}
}

# RFC 3339 text to nanoseconds since the epoch; undefined unless s looks like
# an RFC 3339 date-time. The sidecar evaluates with strict built-in errors (a
# built-in that fails fails the whole decision, closed), so text is checked
# with a regex before it reaches the parser. A trailing "Z" is rewritten to
# "+00:00" first (regopy only accepts the numeric offset form).
rfc3339_pattern := `^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$`

time_ns(s) := time.parse_rfc3339_ns(concat("", [trim_suffix(s, "Z"), "+00:00"])) if {
	parseable_time(s)
	endswith(s, "Z")
} else := time.parse_rfc3339_ns(s) if {
	parseable_time(s)
}

parseable_time(s) if {
	is_string(s)
	regex.match(rfc3339_pattern, s)
	substring(s, 8, 2) <= last_day(substring(s, 0, 4), substring(s, 5, 2))
}

# The last day of a month as two-digit text ("28".."31"). Compared as text:
# regopy's to_number("02") on a built-in's output gives a number that is not 2.
last_day(_, month) := days[month] if {
	month != "02"
	days := {"01": "31", "03": "31", "04": "30", "05": "31", "06": "30", "07": "31", "08": "31", "09": "30", "10": "31", "11": "30", "12": "31"}
}

last_day(year, "02") := "29" if leap_year(to_number(year))

last_day(year, "02") := "28" if not leap_year(to_number(year))

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
