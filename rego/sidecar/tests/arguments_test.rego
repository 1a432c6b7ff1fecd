package sidecar.tests

# "None of these fire" is written [x | some x in [...]; fires(x)] == [] rather
# than every x in [...] { not fires(x) }: regopy cannot evaluate a `not` over a
# function call that depends on the `every` variable.

# --- declared arguments ----------------------------------------------------------

test_declared_argument_present_not_denied if {
	not denies(base_input, "invalid_argument")
}

test_declared_argument_missing_denied if {
	inp := call("read_file", {"file": "/workspace/a"})
	denies(inp, "invalid_argument")
	"invalid_argument: tool \"read_file\" needs argument \"path\" of type string" in decide(inp).reasons
}

test_declared_argument_wrong_type_denied if {
	denies(call("read_file", {"path": 42}), "invalid_argument")
	denies(call("read_file", {"path": ""}), "invalid_argument")
}

test_declared_array_must_be_non_empty if {
	ok := call_as(ops_agent, "delete_records", {"table": "orders", "ids": [7]})
	not denies(ok, "invalid_argument")
	empty := call_as(ops_agent, "delete_records", {"table": "orders", "ids": []})
	denies(empty, "invalid_argument")
}

test_unbounded_delete_denied_even_when_approved if {
	inp := object.union(
		call_as(ops_agent, "delete_records", {"table": "orders"}),
		{"approval": approval},
	)
	d := decide(inp)
	d.outcome == "deny"
	"invalid_argument" in codes(d.reasons)
}

test_other_declared_types if {
	tools := {"t": {"risk": "low", "reversible": true, "server": "s", "arguments": {"o": "object", "n": "number", "b": "boolean"}}}
	not denies(call("t", {"o": {}, "n": 0, "b": false}), "invalid_argument") with data.sidecar.catalog.tools as tools
	denies(call("t", {"o": [], "n": "0", "b": "false"}), "invalid_argument") with data.sidecar.catalog.tools as tools
}

# --- paths --------------------------------------------------------------------

test_path_traversal_denied if {
	inp := call("read_file", {"path": "/workspace/../etc/passwd"})
	denies(inp, "path_traversal")
	d := decide(inp)
	d.outcome == "deny"
	"path_traversal: argument \"path\" of tool \"read_file\" has a \"..\" segment" in d.reasons
}

test_path_traversal_variants_denied if {
	every p in ["..", "../x", "/workspace/a/..", "/workspace\\..\\x"] {
		denies(call("read_file", {"path": p}), "path_traversal")
	}
}

test_path_traversal_checked_for_any_tool if {
	denies(call_as(data_agent, "write_file", {"path": "/workspace/../x", "content": "c"}), "path_traversal")
}

test_dots_inside_a_name_not_traversal if {
	[p |
		some p in ["/workspace/a..b.txt", "/workspace/...", "/workspace/.hidden"]
		denies(call("read_file", {"path": p}), "path_traversal")
	] == []
}

test_path_under_allowed_prefix_not_denied if {
	[p |
		some p in ["/workspace/a.txt", "/data/public/report.csv"]
		denies(call("read_file", {"path": p}), "path_not_allowed")
	] == []
}

test_path_outside_prefixes_denied if {
	every p in ["/etc/passwd", "/workspace", "/workspace-evil/x", "workspace/a", "/data/private/x"] {
		denies(call("read_file", {"path": p}), "path_not_allowed")
	}
	"path_not_allowed: argument \"path\" of tool \"read_file\" is outside /workspace/, /data/public/" in decide(call("read_file", {"path": "/etc/passwd"})).reasons
}

test_prefixes_are_per_tool if {
	denies(call_as(data_agent, "write_file", {"path": "/data/public/x", "content": "c"}), "path_not_allowed")
	not denies(call_as(data_agent, "write_file", {"path": "/workspace/x", "content": "c"}), "path_not_allowed")
}

test_missing_path_fails_closed if {
	denies(call("read_file", {}), "path_not_allowed")
	denies(call("read_file", {"path": ["/workspace/a"]}), "path_not_allowed")
}

test_tool_without_prefixes_not_path_checked if {
	not denies(call("search_docs", {"query": "x", "path": "/etc"}), "path_not_allowed")
}

# --- URLs ---------------------------------------------------------------------

test_url_to_allowed_host_not_denied if {
	allowed := [
		"https://example.org/",
		"https://docs.example.org/guide?x=1",
		"https://api.github.com",
		"HTTPS://PyPI.org/simple/",
		"https://docs.example.org:8443/x",
	]
	[u | some u in allowed; denies(call("http_get", {"url": u}), "url_not_allowed")] == []
	decide(call("http_get", {"url": "https://docs.example.org/a"})).outcome == "allow"
}

test_url_not_allowed_denied if {
	every u in [
		"http://docs.example.org/",
		"https://evil.com/",
		"https://example.org.evil.com/",
		"https://a.b.example.org/",
		"https://user@example.org/",
		"https://169.254.169.254/latest/meta-data",
		"ftp://example.org/",
		"example.org",
	] {
		denies(call("http_get", {"url": u}), "url_not_allowed")
	}
}

test_url_missing_fails_closed if {
	denies(call("http_get", {}), "url_not_allowed")
	denies(call("http_get", {"url": 5}), "url_not_allowed")
}

# --- SQL ----------------------------------------------------------------------

sql(q) := call_as(data_agent, "run_sql", {"query": q})

test_read_only_sql_not_escalated if {
	read_only := [
		"select * from orders",
		"  SELECT count(*) FROM orders WHERE updated_at > now() - interval '1 day';",
		"with recent as (select * from orders) select * from recent",
		"explain select * from orders",
		"show tables",
	]
	[q | some q in read_only; escalates(sql(q), "sql_not_read_only")] == []
	decide(sql("select 1")).outcome == "allow"
}

test_write_sql_escalated if {
	every q in [
		"delete from orders",
		"UPDATE orders SET status = 'x'",
		"insert into t values (1)",
		"drop table orders",
		"select 1; drop table orders",
		"select 1; vacuum full",
		"select * into backup from orders",
		"with d as (delete from orders returning *) select * from d",
		"explain analyze update orders set x = 1",
		"/* hi */ select 1",
	] {
		escalates(sql(q), "sql_not_read_only")
	}
	d := decide(sql("delete from orders"))
	d.outcome == "escalate"
	d.reasons == ["sql_not_read_only: tool \"run_sql\" was asked to run SQL that is not a single read-only statement"]
}

test_approved_write_sql_allowed if {
	inp := object.union(sql("delete from orders where id = 1"), {"approval": approval})
	d := decide(inp)
	d.outcome == "allow"
	d.reasons == [
		"approved: escalation esc-1 approved by spiffe://example.org/ns/humans/sa/alice",
		sprintf("granted: %v is granted tool \"run_sql\"", [data_agent]),
	]
}

test_sql_rule_only_for_sql_tools if {
	not escalates(call("search_docs", {"query": "delete everything"}), "sql_not_read_only")
}

test_sql_missing_query_denied_not_escalated if {
	inp := call_as(data_agent, "run_sql", {})
	denies(inp, "invalid_argument")
	not escalates(inp, "sql_not_read_only")
}

# --- the list phase (MCP tools/list) ----------------------------------------------

listing(name) := object.union(call(name, {}), {"request": {"call_id": "c-1", "time": "2026-11-22T10:00:00Z", "sidecar": "test", "phase": "list"}})

test_list_phase_is_not_denied_for_missing_arguments if {
	not denies(listing("read_file"), "invalid_argument")
	not denies(listing("read_file"), "path_not_allowed")
	not denies(listing("http_get"), "url_not_allowed")
	decide(listing("read_file")).outcome == "allow"
}

test_call_phase_still_judges_arguments if {
	inp := object.union(call("read_file", {}), {"request": {"call_id": "c-1", "time": "2026-11-22T10:00:00Z", "sidecar": "test", "phase": "call"}})
	denies(inp, "invalid_argument")
	denies(inp, "path_not_allowed")
}

test_list_phase_still_denies_what_is_not_about_arguments if {
	decide(listing("no_such_tool")).outcome == "deny"
}
