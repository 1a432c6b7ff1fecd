package sidecar.tests

# base_input: request.time 2026-11-22T10:00:00Z, SVIDs valid until 12:00Z.

test_valid_svid_not_denied if {
	not denies(base_input, "svid_expired")
}

test_expired_svid_denied if {
	inp := mk({"subject": object.union(identity(research), {"svid_expires_at": "2026-11-22T09:59:59Z"})})
	denies(inp, "svid_expired")
	d := decide(inp)
	d.outcome == "deny"
	sprintf("svid_expired: the SVID of %v expired at 2026-11-22T09:59:59Z", [research]) in d.reasons
}

test_svid_expiring_at_request_time_denied if {
	inp := mk({"subject": object.union(identity(research), {"svid_expires_at": "2026-11-22T10:00:00Z"})})
	denies(inp, "svid_expired")
}

test_expiry_with_offset_and_fractions_compared_as_instants if {
	# 11:30+02:00 is 09:30Z: expired.
	expired := mk({"subject": object.union(identity(research), {"svid_expires_at": "2026-11-22T11:30:00+02:00"})})
	denies(expired, "svid_expired")

	# Request time with microseconds, as the sidecar writes it.
	fresh := mk({
		"request": {"call_id": "c", "time": "2026-11-22T10:00:00.123456Z", "sidecar": "t"},
		"subject": object.union(identity(research), {"svid_expires_at": "2026-11-22T10:00:00.5Z"}),
	})
	not denies(fresh, "svid_expired")
}

test_expired_upstream_svid_denied if {
	link := object.union(identity(orchestrator), {"svid_expires_at": "2026-11-21T00:00:00Z"})
	denies(mk({"delegation": [link]}), "svid_expired")
}

test_null_or_unparseable_expiry_not_checked if {
	nul := mk({"subject": object.union(identity(research), {"svid_expires_at": null})})
	not denies(nul, "svid_expired")
	odd := mk({"subject": object.union(identity(research), {"svid_expires_at": "soon"})})
	not denies(odd, "svid_expired")
	notime := mk({"request": {"call_id": "c"}})
	not denies(notime, "svid_expired")
}

test_impossible_dates_not_checked if {
	# Would make the time parser fail (a failed built-in fails the whole
	# decision under strict evaluation); they are treated as unparseable.
	every t in ["2026-02-31T00:00:00Z", "2026-02-29T00:00:00Z", "2026-13-01T00:00:00Z", "2026-11-22T24:00:00Z"] {
		not data.sidecar.time_ns(t)
	}
	data.sidecar.time_ns("2028-02-29T00:00:00Z") == 1835395200000000000
	data.sidecar.time_ns("2000-02-29T00:00:00+01:00") == 951778800000000000
	not data.sidecar.time_ns("1900-02-29T00:00:00Z")
	old := mk({"subject": object.union(identity(research), {"svid_expires_at": "2026-02-31T00:00:00Z"})})
	not denies(old, "svid_expired")
}

# The calendar lives in rfc3339_pattern: every day a month has parses, and
# the pattern refuses every other, so the parser (which fails on them, and
# fails the decision under strict built-in errors) never sees one. 2026 is a
# common year, 2028 a leap year, 2100 is not one.
test_time_ns_knows_the_calendar if {
	last_days := {
		"01": 31, "02": 29, "03": 31, "04": 30, "05": 31, "06": 30,
		"07": 31, "08": 31, "09": 30, "10": 31, "11": 30, "12": 31,
	}
	every month, last in last_days {
		every day in numbers.range(1, last) {
			regex.match(data.sidecar.rfc3339_pattern, sprintf("2026-%s-%02dT23:59:59Z", [month, day]))
		}
		every day in [d | some d in numbers.range(0, 32); not day_in_month(d, last)] {
			not regex.match(data.sidecar.rfc3339_pattern, sprintf("2026-%s-%02dT23:59:59Z", [month, day]))
		}
	}
	data.sidecar.time_ns("2026-02-28T23:59:59Z")
	not data.sidecar.time_ns("2026-02-29T23:59:59Z")
	data.sidecar.time_ns("2028-02-29T23:59:59Z")
	not data.sidecar.time_ns("2100-02-29T23:59:59Z")
	data.sidecar.leap_year(2028)
	data.sidecar.leap_year(2000)
	not data.sidecar.leap_year(2100)
	not data.sidecar.leap_year(2026)
	not regex.match(data.sidecar.rfc3339_pattern, "2026-00-10T00:00:00Z")
	not regex.match(data.sidecar.rfc3339_pattern, "2026-13-10T00:00:00Z")
}

day_in_month(day, last) if {
	day >= 1
	day <= last
}

# OPA's clock runs from 1677-09-21 to 2262-04-11 (nanoseconds in 64 bits);
# parsing a time outside fails, which fails the whole decision under strict
# built-in errors (as the sidecar asks). Such expiries are decided instead:
# after the clock (X.509's "no expiry", 9999-12-31T23:59:59Z, RFC 5280
# 4.1.2.5) is not expired, before it is long expired.
test_expiries_past_opas_clock_are_not_expired if {
	every t in ["9999-12-31T23:59:59Z", "2262-04-11T23:47:17Z", "2262-01-01T00:00:00-23:59", "3000-02-29T00:00:00Z"] {
		not data.sidecar.time_ns(t)
		not denies(mk({"subject": object.union(identity(research), {"svid_expires_at": t})}), "svid_expired")
		not denies(mk({"delegation": [object.union(identity(orchestrator), {"svid_expires_at": t})]}), "svid_expired")
	}
}

test_expiries_before_opas_clock_are_expired if {
	every t in ["1677-09-21T00:12:43Z", "1600-02-29T00:00:00Z", "0000-01-01T00:00:00Z", "1677-12-31T23:59:59+23:59"] {
		not data.sidecar.time_ns(t)
		denies(mk({"subject": object.union(identity(research), {"svid_expires_at": t})}), "svid_expired")
		denies(mk({"delegation": [object.union(identity(orchestrator), {"svid_expires_at": t})]}), "svid_expired")
	}
}

# The first and last years parsed, at the offsets that push them furthest
# out (instants computed with Python's datetime).
test_the_edges_of_opas_clock_parse if {
	data.sidecar.time_ns("1678-01-01T00:00:00+23:59") == -9214646340000000000
	data.sidecar.time_ns("2261-12-31T23:59:59-23:59") == 9214732739000000000
}
