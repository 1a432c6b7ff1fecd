package sidecar.tests

test_low_risk_tool_records_arguments if {
	decide(base_input).obligations == {"record_arguments": true}
}

test_medium_risk_tool_records_no_arguments if {
	d := decide(call_as(data_agent, "write_file", {"path": "/workspace/x", "content": "c"}))
	d.obligations == {}
}

test_low_risk_tool_can_opt_out if {
	d := decide(call("http_get", {"url": "https://example.org/"}))
	d.outcome == "allow"
	not d.obligations.record_arguments
}

test_redacted_arguments_obligation if {
	inp := call_as(ops_agent, "send_email", {"to": ["a@example.org"], "subject": "s", "body": "b"})
	decide(inp).obligations == {"redact_arguments": ["attachments"]}
}

test_redaction_comes_with_record_arguments if {
	tools := {"t": {"risk": "low", "reversible": true, "server": "s", "redact": ["token"]}}
	d := decide(call("t", {})) with data.sidecar.catalog.tools as tools
	d.obligations == {"record_arguments": true, "redact_arguments": ["token"]}
}

test_empty_redact_list_adds_nothing if {
	tools := {"t": {"risk": "medium", "reversible": true, "server": "s", "redact": []}}
	d := decide(call("t", {})) with data.sidecar.catalog.tools as tools
	d.obligations == {}
}

test_obligations_travel_with_a_deny if {
	d := decide(call("read_file", {"path": "/etc/passwd"}))
	d.outcome == "deny"
	d.obligations == {"record_arguments": true}
}

test_unknown_tool_has_no_obligations if {
	decide(call("rm_rf", {})).obligations == {}
}
