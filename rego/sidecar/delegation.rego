# The delegation chain (input.delegation, outermost first): its shape and depth.
# Whether each link is granted the tool is in grants.rego.
package sidecar

deny contains reason([
	"delegation_too_deep: ", count(delegation_links),
	" upstream agents, over the limit of ", show(limit("max_delegation_depth")),
]) if {
	count(delegation_links) > limit("max_delegation_depth")
}

# null or absent means no delegation; anything else that is not a list is denied.
deny contains "invalid_delegation: delegation is not a list" if {
	input.delegation != null
	not is_array(input.delegation)
}

deny contains reason(["invalid_delegation: delegation link ", i, " has no string spiffe_id"]) if {
	some i, link in delegation_links
	not is_string(link.spiffe_id)
}
