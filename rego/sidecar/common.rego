# Helpers shared by the rule files. Nothing here adds a reason by itself.
package sidecar

# The tool's entry in this bundle's catalog (data.sidecar.catalog.tools),
# undefined when the tool is not in the catalog. The rules read the catalog
# from the bundle, not from input.tool.catalog, so the policy decides the same
# way in the embedded engine and in an OPA server holding this bundle.
tool_entry := data.sidecar.catalog.tools[input.tool.name]

# Printable names for reason strings; never undefined, so a reason is never
# lost because the input is odd.
tool_label := input.tool.name if is_string(input.tool.name)
else := "<missing>"

caller_label := input.subject.spiffe_id if is_string(input.subject.spiffe_id)
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

# Reason text from parts: strings as they are, anything else through
# sprintf("%v"). Reasons are built with concat, never by passing strings to
# sprintf: regopy (the embedded engine) renders a string that another built-in
# produced (lower, concat, object.get, json.marshal...) with its JSON quotes
# when it goes through sprintf, which breaks the reason and even the JSON the
# engine returns.
reason(parts) := concat("", [text(part) | some part in parts])

text(x) := x if is_string(x)
else := sprintf("%v", [x])

# Comma-separated text of a list, whatever its members are.
list_text(xs) := concat(", ", [text(x) | some x in xs]) if is_array(xs)
else := text(xs)

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
	is_string(s)
	regex.match(rfc3339_pattern, s)
	endswith(s, "Z")
} else := time.parse_rfc3339_ns(s) if {
	is_string(s)
	regex.match(rfc3339_pattern, s)
}

# True when the call carries a usable human approval: escalation_id and
# approver are non-empty strings. An approval satisfies escalate rules, never
# deny rules (see decision.rego).
approved if {
	is_string(input.approval.escalation_id)
	input.approval.escalation_id != ""
	is_string(input.approval.approver)
	input.approval.approver != ""
}
