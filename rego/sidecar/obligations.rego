# Obligations: instructions to the sidecar that travel with the decision
# (data.sidecar.decision.obligations), whatever the outcome. One rule per key;
# two rules giving one key different values is an evaluation error.
package sidecar

# Low-risk tools: the evidence log may hold their arguments in clear (with
# the sidecar's redaction applied); otherwise it keeps only their sha256. A
# catalog entry can opt out with record_arguments: false.
obligations["record_arguments"] if {
	tool_entry.risk == "low"
	object.get(tool_entry, "record_arguments", true) != false
}

# Argument keys from the catalog's "redact" list: the sidecar replaces their
# values with "[REDACTED]" wherever arguments are shown (evidence in clear,
# the approvers' preview), on top of its built-in secret keys.
obligations["redact_arguments"] := tool_entry.redact if has_redactions

has_redactions if {
	is_array(tool_entry.redact)
	count(tool_entry.redact) > 0
}
