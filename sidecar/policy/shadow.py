"""Shadow mode: a candidate bundle (`policy.shadow_dir`) decides every call too, and is never enforced.

The shadow is a second `PolicyService` (its own managed OPA, its own hot
reload behind the same `opa check --strict` + `opa test` gate). For each call
that reaches policy, `begin` starts the shadow's decision on the same input
document at the same moment as the real one, so the two run concurrently; the
Gate then awaits it in `finish`, which is bounded by the shadow's own budget
(`policy.shadow_timeout_ms`, its OpaClient timeout): a slow shadow costs a call
at most that budget after the real decision, and never changes it. `finish`
never raises: a failing or slow shadow is recorded as
`{"outcome": "deny", "reasons": [...], "revision": ..., "error": ...}` and
counted as a shadow error, not as a transition.

The input the shadow sees differs from the real one in one place: `tool.catalog`
is the shadow bundle's catalog entry, and `tool.facts` are recomputed from it
when the entry differs (a candidate may change a tool's catalog entry).

Metrics (sidecar/metrics.py): `sidecar_shadow_decisions{recorded, shadow}`
counts every pair (equal labels are agreements), `sidecar_shadow_errors`
counts shadow failures.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sidecar.policy.decision import Decision
from sidecar.policy.input import with_catalog_entry
from sidecar.reasons import POLICY_ERROR, Reason

if TYPE_CHECKING:
    from sidecar.metrics import Metrics
    from sidecar.policy.opa.service import PolicyService

log = logging.getLogger(__name__)


class Shadow:
    def __init__(self, service: "PolicyService", metrics: "Metrics | None" = None):
        self.service = service
        self._metrics = metrics

    def health(self) -> tuple[bool, str]:
        """Always ok (a shadow never makes the sidecar NOT_SERVING); the detail says how the shadow is doing."""
        ok, detail = self.service.ready()
        return True, f"never enforced; {'deciding' if ok else 'NOT deciding'}; {detail}"

    def shadow_input(self, document: dict) -> dict:
        """The input document with the shadow bundle's catalog entry (and the facts it implies)."""
        tool = document.get("tool") or {}
        return with_catalog_entry(document, self.service.catalog.entry(str(tool.get("name", ""))))

    def begin(self, document: dict) -> "asyncio.Task[Decision]":
        """Start the shadow's decision on `document` (call just before the real decision)."""
        return asyncio.ensure_future(self._decide(document))

    async def _decide(self, document: dict) -> Decision:
        try:
            return await self.service.decide(self.shadow_input(document))
        except Exception as exc:  # decide never raises; building the shadow's input might
            log.exception("shadow decision failed")
            return Decision.failed(str(Reason(POLICY_ERROR, f"shadow input could not be built ({exc})")), engine="opa")

    async def finish(self, pending: "asyncio.Task[Decision]", real: Decision) -> dict:
        """The shadow's answer as the record keeps it (`shadow`), counted against the real decision."""
        shadow = await pending
        revision = shadow.policy_revision or self.service.revision
        result: dict = {"outcome": shadow.outcome, "reasons": list(shadow.reasons), "revision": revision}
        if shadow.error is not None:
            result["error"] = shadow.error
        if self._metrics is not None:
            self._metrics.observe_shadow(real.outcome, shadow.outcome, shadow.error is not None)
        return result
