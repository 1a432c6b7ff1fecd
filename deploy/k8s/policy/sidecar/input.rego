# The input document itself: its version and the fields every rule relies on.
package sidecar

deny contains reason(["unsupported_input_version: input version ", version_label, " is not \"sidecar/v1\""]) if {
	not input.version == "sidecar/v1"
}

version_label := reason(["\"", show(input.version), "\""]) if {
	is_string(input.version)
} else := "(missing or not a string)"

deny contains "invalid_input: subject.spiffe_id is missing or not a string" if {
	not is_string(input.subject.spiffe_id)
}

deny contains "invalid_input: tool.name is missing or not a string" if {
	not is_string(input.tool.name)
}

deny contains "invalid_input: tool.arguments is missing or not an object" if {
	not is_object(input.tool.arguments)
}
