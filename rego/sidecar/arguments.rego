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

# An argument spelled like one the rules judge by name but for case ("PATH" beside "path"): a tool
# that reads argument names without case may take it in place of the one judged here.
deny contains reason([
	"ambiguous_argument: argument \"", show(key), "\" of tool \"", tool_label,
	"\" is another spelling of \"", show(name), "\"",
]) if {
	judging_arguments
	some key, _ in input.tool.arguments
	some name in judged_argument_names
	key != name
	lower(key) == lower(name)
}

# The arguments rules judge by name: declared, formatted, and "path" (checked on any tool).
judged_argument_names contains name if {
	is_object(tool_entry.arguments)
	some name, _ in tool_entry.arguments
}

judged_argument_names contains name if {
	some name, _ in object.get(tool_entry, "formats", {})
}

judged_argument_names contains "path"

argument_has_type(name, "number") if is_number(input.tool.arguments[name])

argument_has_type(name, "boolean") if is_boolean(input.tool.arguments[name])

# --- structured arguments -------------------------------------------------------
#
# The catalog entry's "formats" ({argument: sql|url|path}) names the arguments
# whose text the sidecar parses; the rules below decide on what the parser
# found (input.tool.facts[argument], sidecar/policy/facts/), never on the
# words. Facts that are missing or say "not parsed" never pass a check.

# Arguments of this tool with the given format, whether the call carries them or not.
formatted_arguments(format) := {name |
	some name, f in object.get(tool_entry, "formats", {})
	f == format
}

# Parsed facts of an argument in the given format; undefined otherwise.
parsed_facts(name, format) := facts if {
	facts := input.tool.facts[name]
	facts.format == format
	facts.parsed == true
}

# --- paths --------------------------------------------------------------------

# A path argument with a ".." segment (also percent-encoded, or as a Unicode
# look-alike) is path traversal, whatever its prefix.
deny contains reason(["path_traversal: argument \"", show(name), "\" of tool \"", tool_label, "\" has a \"..\" segment"]) if {
	some name in formatted_arguments("path")
	parsed_facts(name, "path").traversal == true
}

# Without facts (OPA asked without the sidecar) a path cannot be cleared.
deny contains reason(["path_traversal: argument \"", show(name), "\" of tool \"", tool_label, "\" was not read as a path"]) if {
	some name in formatted_arguments("path")
	_ = input.tool.arguments[name]
	not parsed_facts(name, "path")
}

# A "path" argument of a tool the catalog gives no format for is checked on
# its text, so a tool added without "formats" is not left open.
deny contains reason(["path_traversal: argument \"path\" of tool \"", tool_label, "\" has a \"..\" segment"]) if {
	not "path" in formatted_arguments("path")
	path := input.tool.arguments.path
	is_string(path)
	regex.match(`(^|[/\\])\.\.([/\\]|$)`, path)
}

# Tools listed in limits.path_prefixes: each path argument must start with a
# listed prefix, and be unambiguous (no backslash, no control character). A
# missing path, one that is not a string, and every path when the prefix list
# is not a list of strings are denied too (fail closed).
deny contains reason(["path_not_allowed: argument \"", show(name), "\" of tool \"", tool_label, "\" is outside ", list_text(prefixes)]) if {
	judging_arguments
	prefixes := path_prefixes_for_tool
	some name in formatted_arguments("path")
	not path_allowed(name, prefixes)
}

# limit("path_prefixes")[input.tool.name], read straight from the data: the
# default for path_prefixes is {} (no tool listed), so a missing setting
# gives the same undefined, and only this tool's entry is read.
path_prefixes_for_tool := data.sidecar.limits.path_prefixes[input.tool.name]

path_allowed(name, prefixes) if {
	parsed_facts(name, "path").ambiguous == false
	path := input.tool.arguments[name]
	is_string(path)
	strings_list(prefixes)
	strings.any_prefix_match(path, prefixes)
}

# --- URLs ---------------------------------------------------------------------

# Tools listed in limits.url_hosts: each url argument must be https:// to an
# allowed host as the parser reads it (lower case, IDNA), with no user info
# and nothing parsers read differently; an explicit port is allowed.
deny contains reason(["url_not_allowed: argument \"", show(name), "\" of tool \"", tool_label, "\" is not https:// to one of ", list_text(hosts)]) if {
	judging_arguments
	hosts := url_hosts_for_tool
	some name in formatted_arguments("url")
	not url_allowed(name, hosts)
}

# limit("url_hosts")[input.tool.name], read straight from the data (see
# path_prefixes_for_tool).
url_hosts_for_tool := data.sidecar.limits.url_hosts[input.tool.name]

url_allowed(name, hosts) if {
	facts := parsed_facts(name, "url")
	facts.scheme == "https"
	facts.userinfo == false
	facts.ambiguous == false
	is_string(facts.host)
	is_array(hosts)
	some pattern in hosts
	is_string(pattern)
	glob.match(lower(pattern), ["."], facts.host)
}

# --- SQL ----------------------------------------------------------------------

# Arguments whose catalog format is "sql" are judged by what PostgreSQL's
# parser found in them (input.tool.facts[name], computed by the sidecar:
# sidecar/policy/facts/sql.py), never by their words. Anything that is not
# one read-only statement calling only allowed functions escalates: a human
# approves writes, unknown functions and text the parser refused. A missing
# argument is the declared-arguments rule's job, above.
sql_arguments contains name if {
	some name in formatted_arguments("sql")
	_ = input.tool.arguments[name]
}

# Undefined when the facts are missing (e.g. OPA queried without the
# sidecar) or the parser refused the text.
sql_facts(name) := parsed_facts(name, "sql")

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

# Operators are functions too: a user-defined operator runs its function.
escalate contains reason(["sql_operator_not_allowed: argument \"", show(name), "\" of tool \"", tool_label, "\" uses an operator not in sql_operators"]) if {
	some name in sql_arguments
	some operator in sql_facts(name).operators
	not sql_builtin_allowed(operator, "sql_operators")
}

sql_function_allowed(function) if sql_builtin_allowed(function, "sql_functions")

# Unqualified names, or qualified with pg_catalog (PostgreSQL's built-ins;
# the parser qualifies SQL syntax such as EXTRACT itself). A quoted name
# ("LOWER") is another function and never matches.
sql_builtin_allowed(name, list) if name in limit(list)

sql_builtin_allowed(name, list) if {
	startswith(name, "pg_catalog.")
	substring(name, count("pg_catalog."), -1) in limit(list)
}
