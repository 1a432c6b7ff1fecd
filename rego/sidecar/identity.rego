# The caller's identity: an SVID that expired before the request time is
# denied, for the caller and for every upstream agent. svid_expires_at null
# (or a time that does not parse) is not checked. The time is
# input.request.time, never the clock, so decisions are reproducible.
# Expiries past OPA's clock (after 2262, such as X.509's "no expiry"
# 9999-12-31) are not expired; ones before it (before 1678) are.
package sidecar

deny contains reason(["svid_expired: the SVID of ", show(who.spiffe_id), " expired at ", show(who.svid_expires_at)]) if {
	now := time_ns(input.request.time)
	some who in identities
	expired_by(who.svid_expires_at, now)
}

expired_by(expiry, now) if time_ns(expiry) <= now

expired_by(expiry, _) if before_opas_clock(expiry)
