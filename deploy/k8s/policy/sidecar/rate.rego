# Usage counters from the sidecar (input.usage; each count includes this call).
package sidecar

# Too many calls to this tool by this caller in the sliding window: deny
# (waiting is the remedy; an approval does not lift it).
deny contains reason([
	"rate_limited: ", n, " calls in the last ", window_label,
	", over the limit of ", show(limit("max_calls_in_window")),
]) if {
	n := input.usage.calls_in_window
	is_number(n)
	n > limit("max_calls_in_window")
}

# A task that keeps calling past its budget may be looping: ask a human.
escalate contains reason([
	"task_call_budget_exceeded: ", n, " calls in this task, over the budget of ",
	show(limit("max_calls_in_task")),
]) if {
	n := input.usage.calls_in_task
	is_number(n)
	n > limit("max_calls_in_task")
}

window_label := reason([input.usage.window_seconds, "s"]) if {
	is_number(input.usage.window_seconds)
} else := "window"
