# The tool catalog (data.sidecar.catalog.tools): unknown tools are denied,
# risky or irreversible tools escalate to a human.
package sidecar

deny contains reason(["tool_not_in_catalog: tool \"", tool_label, "\" is not in the tool catalog"]) if {
	not tool_known
}

# A call that names its tool server must name the catalog's one, so a tool of
# the same name on another server is not mistaken for the catalogued tool.
# An empty or absent server is not checked.
deny contains reason([
	"tool_server_mismatch: tool \"", tool_label, "\" is served by \"", show(tool_entry.server),
	"\", not \"", show(input.tool.server), "\"",
]) if {
	is_string(input.tool.server)
	input.tool.server != ""
	is_string(tool_entry.server)
	input.tool.server != tool_entry.server
}

# high and critical escalate; so does a risk that is missing or unknown.
escalate contains reason(["high_risk_tool: tool \"", tool_label, "\" has risk ", show(risk)]) if {
	tool_known
	risk := object.get(tool_entry, "risk", "unset")
	not risk in {"low", "medium"}
}

# Only reversible: true counts as reversible.
escalate contains reason(["irreversible_tool: tool \"", tool_label, "\" cannot be undone"]) if {
	tool_known
	object.get(tool_entry, "reversible", false) != true
}
