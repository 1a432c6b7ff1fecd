package sidecar.tests

test_base_input_is_allowed if {
	d := decide(base_input)
	d.outcome == "allow"
	d.reasons == [sprintf("granted: %v is granted tool \"read_file\"", [research])]
}

test_version_v1_not_denied if {
	not denies(base_input, "unsupported_input_version")
}

test_version_other_denied if {
	denies(mk({"version": "sidecar/v2"}), "unsupported_input_version")
	d := decide(mk({"version": "sidecar/v2"}))
	d.outcome == "deny"
	"unsupported_input_version: input version \"sidecar/v2\" is not \"sidecar/v1\"" in d.reasons
}

test_version_missing_or_not_a_string_denied if {
	denies(object.remove(base_input, ["version"]), "unsupported_input_version")
	d := decide(mk({"version": 1}))
	"unsupported_input_version: input version (missing or not a string) is not \"sidecar/v1\"" in d.reasons
}

# The shape of the input is checked by the sidecar before policy runs
# (sidecar/calls.py); the policy only has to stay closed when it is odd.
test_subject_without_spiffe_id_denied if {
	inp := mk({"subject": {"source": "dev"}})
	denies(inp, "not_granted")
	"not_granted: <missing> is not granted tool \"read_file\"" in decide(inp).reasons
}

test_tool_name_not_string_denied if {
	inp := mk({"tool": {"name": 7, "arguments": {}}})
	denies(inp, "tool_not_in_catalog")
	denies(inp, "not_granted")
}

test_arguments_not_object_denied if {
	inp := mk({"tool": {"name": "search_docs", "arguments": ["q"]}})
	denies(inp, "invalid_argument")
	decide(inp).outcome == "deny"
}

test_empty_input_denied_with_reasons if {
	d := decide({})
	d.outcome == "deny"
	count(d.reasons) > 0
}

test_odd_field_types_deny_without_error if {
	d := decide({
		"version": "sidecar/v1",
		"subject": "me",
		"delegation": {"a": 1},
		"tool": {"name": ["read_file"], "arguments": "x", "server": 5},
		"signals": "high",
		"approval": "yes",
		"usage": [1],
		"request": {"time": 12},
	})
	d.outcome == "deny"
	count(d.reasons) > 0
}
