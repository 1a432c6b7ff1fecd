# Argument rules. Reasons name the argument, never its value: arguments may
# hold secrets, and reasons are recorded and exported in clear.
package sidecar

# MCP tools/list asks whether to show a tool with input.request.phase "list"
# and no arguments (docs/policy-input.md): the rules that judge argument
# values apply to calls only, so an argument rule never hides a tool.
judging_arguments if not input.request.phase == "list"

# Declared arguments (catalog entry "arguments": {name: type}) must be present
# with that type; "string" and "array" must also be non-empty.
deny contains reason(["invalid_argument: tool \"", tool_label, "\" needs argument \"", show(name), "\" of type ", show(kind)]) if {
	judging_arguments
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
	judging_arguments
	prefixes := path_prefixes_for_tool
	not path_under(input.tool.arguments.path, prefixes)
}

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
	judging_arguments
	hosts := url_hosts_for_tool
	not url_allowed(input.tool.arguments.url, hosts)
}

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

# Tools listed in limits.sql_tools: a "query" that is not one read-only
# statement escalates (a human approves writes). A missing query is caught by
# the declared-arguments rule above when the catalog declares it.
escalate contains reason(["sql_not_read_only: tool \"", tool_label, "\" was asked to run SQL that is not a single read-only statement"]) if {
	input.tool.name in limit("sql_tools")
	query := input.tool.arguments.query
	is_string(query)
	not sql_read_only(query)
}

# The keyword lists come from data and are spliced into regexes: the
# limits test checks that they are plain lower-case words.
sql_read_only(query) if {
	strings_list(limit("sql_read_only_statements"))
	strings_list(limit("sql_write_keywords"))
	sql := lower(trim_space(query))
	regex.match(concat("", [`^(`, concat("|", limit("sql_read_only_statements")), `)\b`]), sql)
	not regex.match(`;\s*\S`, sql)
	not regex.match(concat("", [`\b(`, concat("|", limit("sql_write_keywords")), `)\b`]), sql)
}
