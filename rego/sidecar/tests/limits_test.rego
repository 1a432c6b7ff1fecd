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
		"path" in {f | some f in data.sidecar.catalog.tools[tool].formats} # else nothing is checked
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
		"url" in {f | some f in data.sidecar.catalog.tools[tool].formats} # else nothing is checked
		count(hosts) > 0
		every host in hosts {
			regex.match(`^[a-z0-9*][a-z0-9.*-]*$`, host)
		}
	}
}

test_limits_sql_lists if {
	every key in ["sql_read_only_statements", "sql_functions"] {
		count(data.sidecar.limits[key]) > 0
		every word in data.sidecar.limits[key] {
			regex.match(`^[a-z_][a-z0-9_]*$`, word)
		}
	}
}

test_limits_sql_operators if {
	count(data.sidecar.limits.sql_operators) > 0
	every op in data.sidecar.limits.sql_operators {
		is_string(op)
		op != ""
		not contains(op, ".")
	}
}

# The functions that motivated the SQL facts are not allowed.
test_sql_functions_leave_out_side_effects if {
	every f in ["lo_unlink", "lo_import", "lo_export", "pg_read_file", "pg_read_binary_file", "dblink", "dblink_exec", "set_config", "nextval", "setval", "pg_sleep", "pg_advisory_lock", "pg_terminate_backend", "pg_cancel_backend", "current_setting", "query_to_xml"] {
		not f in data.sidecar.limits.sql_functions
	}
}

test_defaults_cover_every_setting if {
	every key, _ in data.sidecar.limits {
		data.sidecar.default_limits[key]
	}
}
