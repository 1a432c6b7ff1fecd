# The shipped settings (data.sidecar.limits) are well formed: a string where a
# number belongs would silently switch a rule off (Rego orders every string
# after every number).
package sidecar.tests

test_limits_numbers if {
	every key in ["risk_score_threshold", "max_calls_in_window", "max_calls_in_task", "max_delegation_depth"] {
		is_number(data.sidecar.limits[key])
		data.sidecar.limits[key] >= 0
	}
}

test_limits_path_prefixes if {
	every tool, prefixes in data.sidecar.limits.path_prefixes {
		is_object(data.sidecar.catalog.tools[tool])
		count(prefixes) > 0
		every prefix in prefixes {
			is_string(prefix)
			startswith(prefix, "/")
			endswith(prefix, "/")
		}
	}
}

test_limits_url_hosts if {
	every tool, hosts in data.sidecar.limits.url_hosts {
		is_object(data.sidecar.catalog.tools[tool])
		count(hosts) > 0
		every host in hosts {
			regex.match(`^[a-z0-9*][a-z0-9.*-]*$`, host)
		}
	}
}

test_limits_sql_words if {
	every tool in data.sidecar.limits.sql_tools {
		is_object(data.sidecar.catalog.tools[tool])
	}
	every key in ["sql_read_only_statements", "sql_write_keywords"] {
		count(data.sidecar.limits[key]) > 0
		every word in data.sidecar.limits[key] {
			regex.match(`^[a-z_]+$`, word)
		}
	}
}

test_defaults_cover_every_setting if {
	every key, _ in data.sidecar.limits {
		data.sidecar.default_limits[key]
	}
}
