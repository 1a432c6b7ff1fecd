# Obligations: instructions to the sidecar that travel with the decision
# (data.sidecar.decision.obligations), whatever the outcome. One rule per key;
# two rules giving one key different values is an evaluation error.
package sidecar

# Low-risk tools without redactions: record the arguments in clear in the
# evidence log (otherwise only their sha256 is recorded). A catalog entry can
# opt out with record_arguments: false.
obligations["record_arguments"] := true if {
	tool_entry.risk == "low"
	object.get(tool_entry, "record_arguments", true) != false
	not has_redactions
}

# Argument names from the catalog's "redact" list: never recorded in clear,
# whatever the config says.
obligations["redact"] := tool_entry.redact if has_redactions

has_redactions if {
	is_array(tool_entry.redact)
	count(tool_entry.redact) > 0
}
