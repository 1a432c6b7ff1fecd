package sidecar.tests

test_granted_caller_allowed if {
	allows(base_input, "granted")
	not denies(base_input, "not_granted")
}

test_caller_without_grant_for_tool_denied if {
	inp := call("run_sql", {"query": "select 1"})
	denies(inp, "not_granted")
	not allows(inp, "granted")
	d := decide(inp)
	d.outcome == "deny"
	sprintf("not_granted: %v is not granted tool \"run_sql\"", [research]) in d.reasons
}

test_caller_from_other_trust_domain_denied if {
	denies(mk({"subject": identity(outsider)}), "not_granted")
}

test_specific_grant_adds_to_namespace_grant if {
	inp := call_as(data_agent, "run_sql", {"query": "select 1"})
	not denies(inp, "not_granted")
	allows(inp, "granted")
}

test_glob_star_stays_within_one_segment if {
	not data.sidecar.granted(identity("spiffe://example.org/ns/agents/sa/team/nested"), "read_file", "caller")
	data.sidecar.granted(identity("spiffe://example.org/ns/agents/sa/anything"), "read_file", "caller")
}

test_wildcard_tools_grant_every_tool if {
	data.sidecar.granted(identity(orchestrator), "delete_records", "link")
	data.sidecar.granted(dev_identity(dev_agent), "send_email", "caller")
	not data.sidecar.granted(identity(research), "delete_records", "caller")
}

test_dev_identity_allowed_read_file if {
	inp := mk({
		"subject": dev_identity(dev_agent),
		"tool": tool("read_file", {"path": "/workspace/a.txt"}),
	})
	d := decide(inp)
	d.outcome == "allow"
	d.reasons == ["granted: spiffe://dev.local/agent is granted tool \"read_file\""]
}

# A dev grant matches only the dev identity the sidecar makes in dev mode: an
# SVID (any other source) that claims a dev.local ID gets nothing from it.
test_dev_grant_needs_source_dev if {
	every source in ["workload_api", "mtls", "jwt_svid"] {
		who := object.union(identity(dev_agent), {"source": source})
		not data.sidecar.granted(who, "read_file", "caller")
	}
	not data.sidecar.granted({"spiffe_id": dev_agent}, "read_file", "caller")
	denies(call_as(dev_agent, "read_file", {"path": "/workspace/a.txt"}), "not_granted")
}

# Without dev/data.yaml (the production bundle, deploy/sync_bundle.py) the
# dev identity has no grant at all.
test_no_dev_grant_without_dev_data if {
	inp := mk({"subject": dev_identity(dev_agent)})
	denies(inp, "not_granted") with data.sidecar.dev as {}
	denies(inp, "not_granted") with data.sidecar.dev.grants as "all"
}

# The shipped grants (grants/data.yaml) grant nothing to a dev.local identity.
test_shipped_grants_carry_no_dev_grant if {
	every grant in data.sidecar.grants {
		not startswith(grant.spiffe_id, "spiffe://dev.local")
	}
}

test_grant_with_odd_shape_grants_nothing if {
	grants := [{"spiffe_id": 5, "tools": ["*"]}, {"spiffe_id": "spiffe://**", "tools": "*"}]
	denies(base_input, "not_granted") with data.sidecar.grants as grants
}

test_delegation_chain_all_granted_allowed if {
	inp := mk({"delegation": [identity(orchestrator)]})
	not denies(inp, "delegation_not_granted")
	d := decide(inp)
	d.outcome == "allow"
	d.reasons == [sprintf("granted: %v is granted tool \"read_file\" (so are all 1 agents upstream of it)", [research])]
}

test_delegation_link_without_grant_denied if {
	# ops-agent may send email, but it is acting for the research agent, which may not.
	inp := mk({
		"subject": identity(ops_agent),
		"delegation": [identity(research)],
		"tool": tool("send_email", {"to": ["a@example.org"], "subject": "hi", "body": "x"}),
	})
	denies(inp, "delegation_not_granted")
	not allows(inp, "granted")
	d := decide(inp)
	d.outcome == "deny"
	sprintf("delegation_not_granted: upstream agent %v is not granted tool \"send_email\"", [research]) in d.reasons
}

test_delegation_cannot_widen_the_caller if {
	# The orchestrator has "*", but the research agent it delegates to lacks run_sql.
	inp := mk({"delegation": [identity(orchestrator)], "tool": tool("run_sql", {"query": "select 1"})})
	denies(inp, "not_granted")
	not denies(inp, "delegation_not_granted")
}

# A delegate-only grant (the orchestrators') covers its identities upstream of
# a caller, never as the caller: with "*" they could otherwise call every tool,
# each new one included, themselves.
test_delegate_only_grant_never_serves_the_caller if {
	some name in ["read_file", "delete_records", "run_sql"]
	not data.sidecar.granted(identity(orchestrator), name, "caller")
	data.sidecar.granted(identity(orchestrator), name, "link")
}

test_delegate_only_caller_denied_not_granted if {
	inp := call_as(orchestrator, "read_file", {"path": "/workspace/a.txt"})
	d := decide(inp)
	d.outcome == "deny"
	sprintf("not_granted: %v is not granted tool \"read_file\"", [orchestrator]) in d.reasons
	not allows(inp, "granted")
}

# The same orchestrator upstream of an agent that holds the tool: allowed.
test_delegate_only_link_still_bounds_by_the_agent if {
	allows(mk({"delegation": [identity(orchestrator)]}), "granted")
	denies(mk({"delegation": [identity(orchestrator)], "tool": tool("run_sql", {"query": "select 1"})}), "not_granted")
}

# delegate_only absent or false: the grant serves callers. Any other value
# (a string, a number, null) narrows the grant to links rather than widening it.
test_delegate_only_values if {
	grants := [{"spiffe_id": orchestrator, "tools": ["*"], "delegate_only": false}]
	data.sidecar.granted(identity(orchestrator), "read_file", "caller") with data.sidecar.grants as grants
	no_key := [{"spiffe_id": orchestrator, "tools": ["*"]}]
	data.sidecar.granted(identity(orchestrator), "read_file", "caller") with data.sidecar.grants as no_key
	every odd in [true, "false", "true", 0, 1, null, []] {
		odd_grants := [{"spiffe_id": orchestrator, "tools": ["*"], "delegate_only": odd}]
		not data.sidecar.granted(identity(orchestrator), "read_file", "caller") with data.sidecar.grants as odd_grants
		data.sidecar.granted(identity(orchestrator), "read_file", "link") with data.sidecar.grants as odd_grants
	}
}

# The shipped grants are well formed and name only catalog tools.
test_grants_well_formed if {
	count(data.sidecar.grants) > 0
	every grant in array.concat(data.sidecar.grants, data.sidecar.dev.grants) {
		is_string(grant.spiffe_id)
		startswith(grant.spiffe_id, "spiffe://")
		is_array(grant.tools)
		every name in grant.tools {
			grantable(name)
		}
		object.get(grant, "delegate_only", false) in {true, false}
	}
}

grantable("*")

grantable(name) if is_object(data.sidecar.catalog.tools[name])
