# The input document's version. The shape of the rest is the sidecar's job:
# it checks the call before policy runs (sidecar/calls.py: tool name,
# arguments an object, sizes and depth) and builds the document from
# verified identities (sidecar/policy/input.py), so the rules here decide
# authorization only. Odd input still never allows: with no usable subject
# or tool, no grant matches and the catalog has no entry.
package sidecar

deny contains reason(["unsupported_input_version: input version ", version_label, " is not \"sidecar/v1\""]) if {
	not version_supported
}

version_supported if input.version == "sidecar/v1"

version_label := reason(["\"", show(input.version), "\""]) if {
	is_string(input.version)
} else := "(missing or not a string)"
