# Argument rules. Reasons name the argument, never its value: arguments may
# hold secrets, and reasons are recorded and exported in clear.
package sidecar

# Declared arguments (catalog entry "arguments": {name: type}) must be present
# with that type; "string" and "array" must also be non-empty.
deny contains reason(["invalid_argument: tool \"", tool_label, "\" needs argument \"", show(name), "\" of type ", show(kind)]) if {
	is_object(tool_entry.arguments)
	some name, kind in tool_entry.arguments
	not argument_has_type(name, kind)
}

argument_has_type(name, "string") if {
	is_string(input.tool.arguments[name])
	input.tool.arguments[name] != ""
}

argument_has_type(name, "array") if {
	is_array(input.tool.arguments[name])
	count(input.tool.arguments[name]) > 0
}

argument_has_type(name, "object") if is_object(input.tool.arguments[name])

argument_has_type(name, "number") if is_number(input.tool.arguments[name])

argument_has_type(name, "boolean") if is_boolean(input.tool.arguments[name])

# --- paths --------------------------------------------------------------------

# A "path" argument of any tool with a ".." segment is path traversal.
deny contains reason(["path_traversal: argument \"path\" of tool \"", tool_label, "\" has a \"..\" segment"]) if {
	path := input.tool.arguments.path
	is_string(path)
	regex.match(`(^|[/\\])\.\.([/\\]|$)`, path)
}

# Tools listed in limits.path_prefixes: "path" must start with a listed prefix.
# A missing or non-string path is denied too, and so is every path when the
# prefix list is not a list of strings (fail closed).
deny contains reason(["path_not_allowed: argument \"path\" of tool \"", tool_label, "\" is outside ", list_text(prefixes)]) if {
	prefixes := path_prefixes_for_tool
	not path_allowed
}

path_allowed if path_under(input.tool.arguments.path, path_prefixes_for_tool)

path_prefixes_for_tool := prefixes if {
	configured := limit("path_prefixes")
	prefixes := configured[input.tool.name]
}

path_under(path, prefixes) if {
	is_string(path)
	strings_list(prefixes)
	strings.any_prefix_match(path, prefixes)
}

# --- URLs ---------------------------------------------------------------------

# Tools listed in limits.url_hosts: "url" must be https:// to an allowed host
# (no user info; an explicit port is allowed).
deny contains reason(["url_not_allowed: argument \"url\" of tool \"", tool_label, "\" is not https:// to one of ", list_text(hosts)]) if {
	hosts := url_hosts_for_tool
	not url_host_allowed
}

url_host_allowed if url_allowed(input.tool.arguments.url, url_hosts_for_tool)

url_hosts_for_tool := hosts if {
	configured := limit("url_hosts")
	hosts := configured[input.tool.name]
}

url_allowed(url, hosts) if {
	host := url_host(url)
	is_array(hosts)
	some pattern in hosts
	is_string(pattern)
	glob.match(lower(pattern), ["."], host)
}

url_host(url) := match[0][1] if {
	is_string(url)
	match := regex.find_all_string_submatch_n(`^https://([a-z0-9.-]+)(:[0-9]+)?([/?#]|$)`, lower(url), 1)
	count(match) == 1
}

# --- SQL ----------------------------------------------------------------------

# Arguments whose catalog format is "sql" are judged by what PostgreSQL's
# parser found in them (input.tool.facts[name], computed by the sidecar:
# sidecar/policy/facts/sql.py), never by their words. Anything that is not
# one read-only statement calling only allowed functions escalates: a human
# approves writes, unknown functions and text the parser refused. A missing
# argument is the declared-arguments rule's job, above.
sql_arguments contains name if {
	some name, format in object.get(tool_entry, "formats", {})
	format == "sql"
	_ = input.tool.arguments[name]
}

# Facts the sidecar could parse; undefined when missing (e.g. OPA queried
# without the sidecar) or when the parser refused the text.
sql_facts(name) := facts if {
	facts := input.tool.facts[name]
	facts.format == "sql"
	facts.parsed == true
}

sql_parsed(name) if sql_facts(name)

escalate contains reason(["sql_unparsed: argument \"", show(name), "\" of tool \"", tool_label, "\" is not SQL the parser accepts"]) if {
	some name in sql_arguments
	not sql_parsed(name)
}

escalate contains reason(["sql_not_single_statement: argument \"", show(name), "\" of tool \"", tool_label, "\" holds ", count(sql_facts(name).statements), " statements"]) if {
	some name in sql_arguments
	count(sql_facts(name).statements) != 1
}

escalate contains reason(["sql_write: argument \"", show(name), "\" of tool \"", tool_label, "\" writes, locks or runs a statement that is not read-only"]) if {
	some name in sql_arguments
	sql_writes(sql_facts(name))
}

sql_writes(facts) if {
	some command in facts.commands
	not command in limit("sql_read_only_statements")
}

sql_writes(facts) if count(facts.tables_written) > 0

sql_writes(facts) if facts.row_locks == true

escalate contains reason(["sql_function_not_allowed: argument \"", show(name), "\" of tool \"", tool_label, "\" calls a function not in sql_functions"]) if {
	some name in sql_arguments
	some function in sql_facts(name).functions
	not sql_function_allowed(function)
}

# Unqualified names, or qualified with pg_catalog (PostgreSQL's built-ins;
# the parser qualifies SQL syntax such as EXTRACT itself). A quoted name
# ("LOWER") is another function and never matches.
sql_function_allowed(function) if function in limit("sql_functions")

sql_function_allowed(function) if {
	startswith(function, "pg_catalog.")
	substring(function, count("pg_catalog."), -1) in limit("sql_functions")
}
