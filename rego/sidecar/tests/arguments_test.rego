package sidecar.tests

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

test_another_spelling_of_a_judged_argument_denied if {
	inp := call("read_file", {"path": "/workspace/a", "PATH": "/etc/shadow"})
	"ambiguous_argument: argument \"PATH\" of tool \"read_file\" is another spelling of \"path\"" in decide(inp).reasons
	denies(call("read_file", {"path": "/workspace/a", "Path": "x"}), "ambiguous_argument")
	denies(call_as(data_agent, "write_file", {"path": "/workspace/x", "content": "c", "CONTENT": "d"}), "ambiguous_argument")
	not denies(base_input, "ambiguous_argument")
	not denies(call("read_file", {"path": "/workspace/a", "paths": "x"}), "ambiguous_argument")
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

# --- paths and URLs judged by their parsers ------------------------------------

test_path_traversal_hidden_from_a_regex_denied if {
	every p in ["/workspace/%2e%2e/etc/passwd", "/workspace/%2E%2E/x", "/workspace/\u2025/etc", "/workspace/a/../../etc"] {
		denies(call("read_file", {"path": p}), "path_traversal")
	}
}

test_ambiguous_path_denied if {
	every p in ["/workspace\\notes", "/workspace/a\tb", "/workspace/a\nb"] {
		denies(call("read_file", {"path": p}), "path_not_allowed")
	}
}

# A tool added without "formats" still has its "path" argument checked.
test_path_traversal_checked_without_formats if {
	tools := {"t": {"risk": "low", "reversible": true, "server": "s"}}
	denies(call("t", {"path": "/workspace/../x"}), "path_traversal") with data.sidecar.catalog.tools as tools
	not denies(call("t", {"path": "/workspace/x"}), "path_traversal") with data.sidecar.catalog.tools as tools
}

test_url_tricks_denied if {
	every u in [
		"https://example.org:443@evil.com/",
		"https://evil.com#@example.org",
		"https://example.org\\@evil.com/",
		"https://exam\tple.org/",
		"https://%65xample.org/",
		"https://\u0435xample.org/",
		"https://example.org./",
		"https:example.org",
		"//example.org/",
	] {
		denies(call("http_get", {"url": u}), "url_not_allowed")
	}
}

# An international host is compared in the IDNA (xn--) form DNS is asked
# for, and must be written so: its Unicode form is ambiguous (parsers map
# characters such as "ß" differently).
test_url_host_compared_as_the_parser_reads_it if {
	hosts := {"http_get": ["xn--bcher-kva.example"]}
	not denies(call("http_get", {"url": "https://xn--bcher-kva.example/"}), "url_not_allowed") with data.sidecar.limits.url_hosts as hosts
	not denies(call("http_get", {"url": "https://XN--BCHER-KVA.example/"}), "url_not_allowed") with data.sidecar.limits.url_hosts as hosts
	denies(call("http_get", {"url": "https://b\u00fccher.example/"}), "url_not_allowed") with data.sidecar.limits.url_hosts as hosts
}

test_missing_facts_fail_closed if {
	denies(with_facts(tool("http_get", {"url": "https://example.org/"}), {}), "url_not_allowed")
	denies(with_facts(tool("read_file", {"path": "/workspace/a"}), {}), "path_not_allowed")
	tools := {"t": {"risk": "low", "reversible": true, "server": "s", "formats": {"p": "path"}}}
	denies(with_facts(tool("t", {"p": "/x"}), {}), "path_traversal") with data.sidecar.catalog.tools as tools
	not denies(call("t", {"p": "/workspace/a"}), "path_traversal") with data.sidecar.catalog.tools as tools
	unparsed := {"url": {"format": "url", "parsed": false, "error": "x"}}
	denies(with_facts(tool("http_get", {"url": "https://example.org/"}), unparsed), "url_not_allowed")
	other := {"url": {"format": "path", "parsed": true, "error": null, "ambiguous": false, "traversal": false}}
	denies(with_facts(tool("http_get", {"url": "https://example.org/"}), other), "url_not_allowed")
}

# A call of tool object t with exactly these facts.
with_facts(t, facts) := mk({"tool": object.union(object.remove(t, ["facts"]), {"facts": facts})})

# --- SQL ----------------------------------------------------------------------
#
# The rules read the facts the sidecar's parser computed (input.tool.facts);
# tests/test_policy_facts_sql.py checks that the parser gives these facts for
# these texts, and the end-to-end tests run both through `agent-sidecar check`.

# Facts of a read-only query, with some keys replaced.
sql_facts(patch) := object.union(
	{
		"format": "sql", "parsed": true, "error": null,
		"statements": ["select"], "commands": ["select"],
		"tables_read": ["orders"], "tables_written": [],
		"functions": [], "operators": [], "row_locks": false,
	},
	patch,
)

unparsed := {"format": "sql", "parsed": false, "error": "syntax error at or near \"sel\", at index 0"}

# A run_sql call by the data agent carrying `facts` for its query.
sql_call(q, facts) := mk({
	"subject": identity(data_agent),
	"tool": object.union(tool("run_sql", {"query": q}), {"facts": {"query": facts}}),
})

test_read_only_sql_allowed if {
	inp := sql_call("select count(*) from orders", sql_facts({"functions": ["count"]}))
	d := decide(inp)
	d.outcome == "allow"
	d.reasons == [sprintf("granted: %v is granted tool \"run_sql\"", [data_agent])]
}

test_read_only_variants_not_escalated if {
	read_only := [
		sql_facts({}),
		sql_facts({"statements": ["explain"], "commands": ["explain", "select"]}),
		sql_facts({"statements": ["show"], "commands": ["show"], "tables_read": []}),
		sql_facts({"functions": ["pg_catalog.extract", "lower", "date_trunc", "now"]}),
	]
	[f | some f in read_only; escalated_sql(f)] == []
}

escalated_sql(facts) if {
	some code in escalate_codes(sql_call("q", facts))
	startswith(code, "sql_")
}

# select lo_unlink(16403): a SELECT that deletes a large object.
test_function_not_on_allow_list_escalates if {
	inp := sql_call("select lo_unlink(16403)", sql_facts({"functions": ["lo_unlink"], "tables_read": []}))
	d := decide(inp)
	d.outcome == "escalate"
	d.reasons == ["sql_function_not_allowed: argument \"query\" of tool \"run_sql\" calls a function not in sql_functions"]
}

test_function_variants_escalate if {
	every functions in [
		["pg_read_file"], ["dblink"], ["set_config"], ["nextval"], ["pg_sleep"], ["lo_import"],
		["pg_catalog.lo_unlink"], ["public.lower"], ["\"LOWER\""], ["\"pg_catalog.lower\""],
		["count", "pg_advisory_lock"],
	] {
		escalates(sql_call("q", sql_facts({"functions": functions})), "sql_function_not_allowed")
	}
}

test_writes_escalate if {
	every facts in [
		sql_facts({"statements": ["delete"], "commands": ["delete"], "tables_read": [], "tables_written": ["orders"]}),
		sql_facts({"commands": ["delete", "select"], "tables_written": ["orders"]}), # WITH d AS (DELETE ...) SELECT
		sql_facts({"statements": ["select_into"], "commands": ["select_into"], "tables_written": ["backup"]}),
		sql_facts({"statements": ["explain"], "commands": ["explain", "update"], "tables_written": ["orders"]}),
		sql_facts({"statements": ["copy"], "commands": ["copy"]}), # COPY orders TO PROGRAM
		sql_facts({"statements": ["set"], "commands": ["set"], "tables_read": []}), # SET ROLE
		sql_facts({"statements": ["do"], "commands": ["do"], "tables_read": []}),
		sql_facts({"statements": ["call"], "commands": ["call"], "tables_read": []}),
		sql_facts({"row_locks": true}), # SELECT ... FOR UPDATE
		sql_facts({"tables_written": ["orders"]}), # whatever the kind, a written table is a write
	] {
		escalates(sql_call("q", facts), "sql_write")
	}
}

test_operator_not_on_allow_list_escalates if {
	every operators in [["public.==="], ["==="], ["pg_catalog.!!!"], ["=", "@@@"]] {
		escalates(sql_call("q", sql_facts({"operators": operators})), "sql_operator_not_allowed")
	}
	not escalates(sql_call("q", sql_facts({"operators": ["=", "~~", "pg_catalog.+", "BETWEEN"]})), "sql_operator_not_allowed")
}

test_several_statements_escalate if {
	inp := sql_call("select 1; select 2", sql_facts({"statements": ["select", "select"]}))
	escalates(inp, "sql_not_single_statement")
	"sql_not_single_statement: argument \"query\" of tool \"run_sql\" holds 2 statements" in decide(inp).reasons
}

test_unparsed_sql_escalates if {
	inp := sql_call("sel ect", unparsed)
	d := decide(inp)
	d.outcome == "escalate"
	d.reasons == ["sql_unparsed: argument \"query\" of tool \"run_sql\" is not SQL the parser accepts"]
}

# Facts missing (OPA asked without the sidecar, or by an older sidecar), of
# another format, or not an object: unknown, so escalated.
test_missing_or_odd_facts_escalate if {
	every tool_facts in [{}, {"query": sql_facts({"format": "url"})}, {"query": "select"}, {"other": sql_facts({})}] {
		inp := mk({
			"subject": identity(data_agent),
			"tool": object.union(tool("run_sql", {"query": "select 1"}), {"facts": tool_facts}),
		})
		escalates(inp, "sql_unparsed")
	}
	escalates(call_as(data_agent, "run_sql", {"query": "select 1"}), "sql_unparsed")
}

test_approved_write_sql_allowed if {
	facts := sql_facts({"statements": ["delete"], "commands": ["delete"], "tables_written": ["orders"]})
	inp := object.union(sql_call("delete from orders where id = 1", facts), {"approval": approval})
	d := decide(inp)
	d.outcome == "allow"
	d.reasons == [
		"approved: escalation esc-1 approved by spiffe://example.org/ns/humans/sa/alice",
		sprintf("granted: %v is granted tool \"run_sql\"", [data_agent]),
	]
}

test_allow_lists_come_from_data if {
	inp := sql_call("select lo_unlink(1)", sql_facts({"functions": ["lo_unlink"]}))
	not escalates(inp, "sql_function_not_allowed") with data.sidecar.limits.sql_functions as ["lo_unlink"]
	set_role := sql_call("set role x", sql_facts({"statements": ["set"], "commands": ["set"]}))
	not escalates(set_role, "sql_write") with data.sidecar.limits.sql_read_only_statements as ["set"]
}

# Only arguments the catalog marks as SQL are judged as SQL.
test_sql_rules_only_for_sql_arguments if {
	inp := call("search_docs", {"query": "delete everything"})
	[c | some c in escalate_codes(inp); startswith(c, "sql_")] == []
}

test_sql_format_from_the_catalog if {
	tools := {"q": {"risk": "low", "reversible": true, "server": "s", "formats": {"text": "sql"}}}
	escalates(call("q", {"text": "select 1"}), "sql_unparsed") with data.sidecar.catalog.tools as tools
}

test_sql_missing_query_denied_not_escalated if {
	inp := call_as(data_agent, "run_sql", {})
	denies(inp, "invalid_argument")
	[c | some c in escalate_codes(inp); startswith(c, "sql_")] == []
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
