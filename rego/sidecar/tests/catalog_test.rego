package sidecar.tests

test_tool_not_in_catalog_denied if {
	d := decide(call("rm_rf", {}))
	d.outcome == "deny"
	"tool_not_in_catalog: tool \"rm_rf\" is not in the tool catalog" in d.reasons
}

test_catalog_tool_not_denied_as_unknown if {
	not denies(base_input, "tool_not_in_catalog")
}

test_server_mismatch_denied if {
	inp := mk({"tool": object.union(tool("read_file", {"path": "/workspace/a"}), {"server": "shadow-fs"})})
	denies(inp, "tool_server_mismatch")
}

test_server_match_not_denied if {
	inp := mk({"tool": object.union(tool("read_file", {"path": "/workspace/a"}), {"server": "filesystem"})})
	not denies(inp, "tool_server_mismatch")
	decide(inp).outcome == "allow"
}

test_empty_server_not_checked if {
	base_input.tool.server == ""
	not denies(base_input, "tool_server_mismatch")
}

test_high_risk_tool_escalates if {
	inp := call_as(ops_agent, "send_email", {"to": ["a@example.org"], "subject": "hi", "body": "hello"})
	escalates(inp, "high_risk_tool")
}

test_critical_tool_escalates if {
	inp := call_as(ops_agent, "delete_records", {"table": "orders", "ids": [1, 2]})
	escalates(inp, "high_risk_tool")
	d := decide(inp)
	d.outcome == "escalate"
	"high_risk_tool: tool \"delete_records\" has risk critical" in d.reasons
}

test_low_and_medium_tools_not_high_risk if {
	not escalates(base_input, "high_risk_tool")
	not escalates(call_as(data_agent, "write_file", {"path": "/workspace/r.md", "content": "x"}), "high_risk_tool")
}

test_unknown_or_missing_risk_escalates if {
	tools := {
		"odd": {"risk": "spicy", "reversible": true, "server": "x"},
		"bare": {"reversible": true, "server": "x"},
	}
	escalates(call("odd", {}), "high_risk_tool") with data.sidecar.catalog.tools as tools
	escalates(call("bare", {}), "high_risk_tool") with data.sidecar.catalog.tools as tools
}

test_irreversible_tool_escalates if {
	inp := call_as(ops_agent, "send_email", {"to": ["a@example.org"], "subject": "hi", "body": "hello"})
	escalates(inp, "irreversible_tool")
}

test_reversible_tool_not_irreversible if {
	not escalates(base_input, "irreversible_tool")
}

test_missing_reversible_counts_as_irreversible if {
	tools := {"bare": {"risk": "low", "server": "x"}}
	escalates(call("bare", {}), "irreversible_tool") with data.sidecar.catalog.tools as tools
}

# The shipped catalog is well formed: a typo here would silently change rules.
test_catalog_entries_well_formed if {
	count(data.sidecar.catalog.tools) > 0
	every _, entry in data.sidecar.catalog.tools {
		entry.risk in {"low", "medium", "high", "critical"}
		is_boolean(entry.reversible)
		is_string(entry.owner)
		entry.owner != ""
		is_string(entry.description)
		entry.description != ""
		is_string(entry.server)
		entry.server != ""
		every _, kind in object.get(entry, "arguments", {}) {
			kind in {"string", "array", "object", "number", "boolean"}
		}
		every path in object.get(entry, "redact", []) {
			is_string(path)
		}
		every name, format in object.get(entry, "formats", {}) {
			format in {"sql", "url", "path"} # the formats sidecar/policy/facts parses
			object.get(entry, "arguments", {})[name] == "string"
		}
	}
}

test_catalog_has_the_contract_tools if {
	every name in ["search_docs", "read_file", "write_file", "run_sql", "send_email", "delete_records", "http_get", "create_ticket"] {
		data.sidecar.catalog.tools[name]
	}
}
