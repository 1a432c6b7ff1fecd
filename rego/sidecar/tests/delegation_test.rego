package sidecar.tests

chain(n) := [identity(sprintf("spiffe://example.org/ns/orchestrators/sa/o%d", [i])) | some i in numbers.range(1, n)]

test_delegation_at_limit_not_denied if {
	count(chain(3)) == 3
	inp := mk({"delegation": chain(3)})
	not denies(inp, "delegation_too_deep")
	decide(inp).outcome == "allow"
}

test_delegation_over_limit_denied if {
	inp := mk({"delegation": chain(4)})
	denies(inp, "delegation_too_deep")
	"delegation_too_deep: 4 upstream agents, over the limit of 3" in decide(inp).reasons
}

test_delegation_limit_comes_from_data if {
	denies(mk({"delegation": chain(2)}), "delegation_too_deep") with data.sidecar.limits.max_delegation_depth as 1
}

test_no_delegation_not_denied if {
	not denies(base_input, "delegation_too_deep")
	not denies(base_input, "invalid_delegation")
}

test_null_delegation_means_none if {
	not denies(mk({"delegation": null}), "invalid_delegation")
	decide(mk({"delegation": null})).outcome == "allow"
}

test_delegation_not_a_list_denied if {
	denies(mk({"delegation": "spiffe://example.org/x"}), "invalid_delegation")
}

test_delegation_link_without_spiffe_id_denied if {
	inp := mk({"delegation": [{"source": "jwt_svid"}]})
	denies(inp, "invalid_delegation")
	"invalid_delegation: delegation link 0 has no string spiffe_id" in decide(inp).reasons
}
