# The caller's identity: an SVID that expired before the request time is
# denied, for the caller and for every upstream agent. svid_expires_at null
# (or a time that does not parse) is not checked. The time is
# input.request.time, never the clock, so decisions are reproducible.
package sidecar

deny contains reason(["svid_expired: the SVID of ", show(who.spiffe_id), " expired at ", show(who.svid_expires_at)]) if {
	now := time_ns(input.request.time)
	some who in identities
	expires := time_ns(who.svid_expires_at)
	expires <= now
}
