# The delegation chain (input.delegation, outermost first): its shape and depth.
# Whether each link is granted the tool is in grants.rego.
package sidecar

deny contains reason([
	"delegation_too_deep: ", count(delegation_links),
	" upstream agents, over the limit of ", show(limit("max_delegation_depth")),
]) if {
	count(delegation_links) > limit("max_delegation_depth")
}

# null or absent means no delegation; anything else that is not a list is
# denied (delegation_links would otherwise treat it as no delegation).
deny contains "invalid_delegation: delegation is not a list" if {
	not delegation_absent_or_list
}

# One rule with else branches, most common case first, so a call with a
# delegation list stops at the first test.
delegation_absent_or_list if {
	is_array(input.delegation)
} else if {
	input.delegation == null
} else if {
	not delegation_given
}

delegation_given if _ = input.delegation

# A link whose identity cannot be read cannot be checked against the grants.
deny contains reason(["invalid_delegation: delegation link ", i, " has no string spiffe_id"]) if {
	some i, link in delegation_links
	not link_has_id(link)
}

link_has_id(link) if is_string(link.spiffe_id)
