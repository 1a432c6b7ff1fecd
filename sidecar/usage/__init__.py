"""Usage counters behind `input.usage`: one Protocol, two stores.

    memory    (default) counts in this sidecar's memory: reset on restart,
              not shared with other replicas (sidecar/usage/memory.py);
    postgres  counts in PostgreSQL, shared by every sidecar on the same
              database and kept across restarts (sidecar/usage/postgres.py).

Both count the same things (docs/policy-input.md `usage`):

    calls_in_window  calls by this subject to this tool in the last
                     window_seconds, this one included;
    calls_in_task    calls carrying this task id, this one included
                     (0 without a task id).

A store that cannot count raises UsageUnavailable; the Gate then denies the
call with the reason code `usage_unavailable` (fail closed: a limit that
cannot be checked is not assumed to be met).
"""

from __future__ import annotations

from typing import Protocol

from sidecar.policy.input import Usage

__all__ = ["Usage", "UsageCounter", "UsageUnavailable"]


class UsageUnavailable(Exception):
    """The store could not count this call; str() says why (no secrets: the DSN is never quoted)."""


class UsageCounter(Protocol):
    """Counts calls for `input.usage`. Each call of `count` counts one call."""

    async def open(self) -> None:
        """Get ready; never raises for an unreachable store (count raises then, health says why)."""
        ...

    async def count(self, subject: str, tool: str, task_id: str) -> Usage:
        """Count one call by `subject` (SPIFFE ID) to `tool` in task `task_id` ("" = none).

        Returns the usage including this call. Raises UsageUnavailable when
        the store cannot count it.
        """
        ...

    async def peek(self, subject: str, tool: str) -> Usage:
        """The usage a call made now would see (it included, `calls_in_task` 0), counting nothing.

        For the MCP gateway's tools/list phase. Raises UsageUnavailable like `count`.
        """
        ...

    def health(self) -> tuple[bool, str]:
        """(ok, detail): not ok while the last attempt to count failed."""
        ...

    async def aclose(self) -> None: ...
