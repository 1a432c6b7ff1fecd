"""Exposed tool names: upstream `U`'s tool `T` is offered to agents as `U__T`, always.

Always prefixed (not only on a collision), so a tool's exposed name never
changes meaning when another upstream adds a tool of the same name. Upstream
names are `[a-z0-9-]` (no underscore: config refuses others), so the first
`__` splits an exposed name unambiguously. An upstream tool is refused
(hidden from tools/list, `unknown_tool` on tools/call) when its name is not
an MCP tool name (1-128 of `A-Z a-z 0-9 _ - .`), when the exposed name would
pass 128 characters, or when it starts with `<upstream>__` for any
configured upstream: a tool that tries to look like another upstream's.
"""

from __future__ import annotations

import re
from typing import Iterable

SEPARATOR = "__"
UPSTREAM_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
MAX_EXPOSED = 128


def exposed_name(upstream: str, tool: str) -> str:
    return f"{upstream}{SEPARATOR}{tool}"


def split_name(name: str) -> tuple[str, str] | None:
    """(upstream, tool) of an exposed name, or None when it has no `__`."""
    upstream, sep, tool = name.partition(SEPARATOR)
    if not sep or not upstream or not tool:
        return None
    return upstream, tool


def refusal(upstream: str, tool: str, upstreams: Iterable[str]) -> str | None:
    """Why upstream's `tool` is not offered, or None when it is fine."""
    if not TOOL_NAME.fullmatch(tool):
        return f"tool name {tool[:140]!r} of upstream {upstream} is not a valid MCP tool name"
    if len(exposed_name(upstream, tool)) > MAX_EXPOSED:
        return f"tool name {tool!r} of upstream {upstream} is too long to expose as {upstream}{SEPARATOR}<tool>"
    for other in upstreams:
        if tool.startswith(other + SEPARATOR):
            return (
                f"tool name {tool!r} of upstream {upstream} starts with {other + SEPARATOR!r}, "
                f"like upstream {other}'s tools: refused"
            )
    return None
