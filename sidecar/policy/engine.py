"""The one interface every policy engine implements.

`evaluate` never raises: an engine that cannot decide returns
`Decision.failed(...)`, a deny that names the failure (fail closed).
"""

from __future__ import annotations

from typing import Protocol

from sidecar.policy.decision import Decision


class PolicyEngine(Protocol):
    name: str

    async def start(self) -> None:
        """Load policy and begin any background work (reload, health probes)."""
        ...

    async def evaluate(self, input_document: dict) -> Decision: ...

    def catalog_entry(self, tool: str) -> dict | None:
        """The serving bundle's catalog entry for `tool` (data.sidecar.catalog.tools), or None."""
        ...

    @property
    def revision(self) -> str:
        """The revision of the policy now serving ("" when none is loaded)."""
        ...

    def health(self) -> tuple[bool, str]:
        """(serving, detail) for the health service and logs."""
        ...

    async def close(self) -> None: ...
