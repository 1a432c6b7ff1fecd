# Grants (data.sidecar.grants): who may call which tool.
#
# The caller (input.subject) AND every agent upstream of it
# (input.delegation) must be granted the tool: an agent cannot obtain a tool
# it lacks by asking another agent to call it, and a delegated call can do no
# more than the least-privileged agent in the chain.
package sidecar

# True when some grant's spiffe_id glob ("/" delimiter) matches id and the
# grant lists tool or "*".
granted(id, tool) if {
	is_string(id)
	is_string(tool)
	some grant in data.sidecar.grants
	is_string(grant.spiffe_id)
	glob.match(grant.spiffe_id, ["/"], id)
	grant_covers(grant, tool)
}

grant_covers(grant, tool) if {
	is_array(grant.tools)
	some name in grant.tools
	name in {"*", tool}
}

deny contains reason(["not_granted: ", caller_label, " is not granted tool \"", tool_label, "\""]) if {
	not granted(input.subject.spiffe_id, input.tool.name)
}

deny contains reason(["delegation_not_granted: upstream agent ", show(link.spiffe_id), " is not granted tool \"", tool_label, "\""]) if {
	some link in delegation_links
	is_string(link.spiffe_id)
	not granted(link.spiffe_id, input.tool.name)
}

allow contains reason(["granted: ", caller_label, " is granted tool \"", tool_label, "\"", chain_note]) if {
	is_object(tool_entry)
	granted(input.subject.spiffe_id, input.tool.name)
	every link in delegation_links {
		granted(link.spiffe_id, input.tool.name)
	}
}

chain_note := reason([" (so are all ", count(delegation_links), " agents upstream of it)"]) if {
	count(delegation_links) > 0
} else := ""
