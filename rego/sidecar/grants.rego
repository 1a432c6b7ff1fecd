# Grants: who may call which tool.
#
# The caller (input.subject) AND every agent upstream of it
# (input.delegation) must be granted the tool: an agent cannot obtain a tool
# it lacks by asking another agent to call it, and a delegated call can do no
# more than the least-privileged agent in the chain.
#
# The grants are data.sidecar.grants (grants/data.yaml, shipped everywhere)
# plus data.sidecar.dev.grants (dev/data.yaml, the dev identity's grant). The
# production bundle is built without dev/ (deploy/sync_bundle.py), and even
# where it is loaded a dev grant only matches a subject whose source is "dev",
# an identity the sidecar makes only when its config asks for dev mode.
package sidecar

# True when some grant's spiffe_id glob ("/" delimiter) matches the identity,
# the grant lists tool or "*", and it serves the identity's role: "caller" (the
# subject making the call) or "link" (an agent upstream of it, in
# input.delegation).
#
# The grant checks are written out in each body rather than called through a
# helper per grant: this loop runs for the caller and every upstream agent on
# every call, and a function call per grant costs more than the checks. The
# dev grants are read only for a dev subject, and only when they are a list
# (anything else grants nothing).
granted(who, tool, role) if {
	is_string(who.spiffe_id)
	is_string(tool)
	some grant in data.sidecar.grants
	is_string(grant.spiffe_id)
	glob.match(grant.spiffe_id, ["/"], who.spiffe_id)
	grant_covers(grant, tool)
	grant_serves(grant, role)
}

granted(who, tool, role) if {
	who.source == "dev"
	is_string(who.spiffe_id)
	is_string(tool)
	is_array(data.sidecar.dev.grants)
	some grant in data.sidecar.dev.grants
	is_string(grant.spiffe_id)
	glob.match(grant.spiffe_id, ["/"], who.spiffe_id)
	grant_covers(grant, tool)
	grant_serves(grant, role)
}

# A membership test, not a loop over grant.tools: `in` on a list is one
# built-in call. The is_array guard keeps an object or a string "tools" from
# matching (`in` would look at an object's values).
grant_covers(grant, tool) if {
	is_array(grant.tools)
	tool in grant.tools
}

grant_covers(grant, _) if {
	is_array(grant.tools)
	"*" in grant.tools
}

# A grant with `delegate_only: true` serves its identities only as agents
# upstream of a caller: an orchestrator that only hands work to agents never
# calls a tool itself. Any other value than absent or false counts as true,
# so a mistyped setting narrows the grant rather than widening it.
grant_serves(_, "link")

grant_serves(grant, "caller") if not "delegate_only" in object.keys(grant)

grant_serves(grant, "caller") if grant.delegate_only == false

caller_granted if granted(input.subject, input.tool.name, "caller")

link_granted(link) if granted(link, input.tool.name, "link")

deny contains reason(["not_granted: ", caller_label, " is not granted tool \"", tool_label, "\""]) if {
	not caller_granted
}

deny contains reason(["delegation_not_granted: upstream agent ", show(link.spiffe_id), " is not granted tool \"", tool_label, "\""]) if {
	some link in delegation_links
	is_string(link.spiffe_id)
	not link_granted(link)
}

allow contains reason(["granted: ", caller_label, " is granted tool \"", tool_label, "\"", chain_note]) if {
	tool_known
	caller_granted
	every link in delegation_links {
		link_granted(link)
	}
}

chain_note := reason([" (so are all ", count(delegation_links), " agents upstream of it)"]) if {
	count(delegation_links) > 0
} else := ""
