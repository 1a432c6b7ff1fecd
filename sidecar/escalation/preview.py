"""The argument preview approvers see: redacted with the evidence rules, then cut to size.

Secrets are redacted by the evidence stage's one rule set
(sidecar/evidence/redaction.py, plus `evidence.redact_keys` and a decision's
`redact_arguments` obligation) before the preview is stored, so the escalation store never holds a secret
in clear. Long strings, lists and objects are shortened with a marker.
"""

from __future__ import annotations

from typing import Any, Mapping

from sidecar.canonical import NotCanonicalizable, canonical_json
from sidecar.evidence.redaction import Redactor, obligation_keys

MAX_STRING = 256
MAX_ITEMS = 50
TRUNCATED = "…[truncated]"


def _shorten(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else value[:MAX_STRING] + TRUNCATED
    if depth > 8:
        return TRUNCATED
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(k): _shorten(v, depth + 1) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out[TRUNCATED] = f"{len(items) - MAX_ITEMS} more keys"
        return out
    if isinstance(value, list):
        out_list = [_shorten(v, depth + 1) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            out_list.append(f"{TRUNCATED} {len(value) - MAX_ITEMS} more items")
        return out_list
    return value


def argument_preview(
    arguments: Any,
    *,
    redactor: Redactor,
    obligations: Mapping[str, Any] | None = None,
    max_bytes: int = 4096,
) -> dict | None:
    """The redacted, shortened arguments, or None when they cannot be shown.

    `redactor` is the deployment's rule set (`evidence.redact_keys`), kept by the caller so
    its caches stay warm; the decision's `redact_arguments` obligation is added to it."""
    if not isinstance(arguments, dict) or max_bytes <= 0:
        return None
    clear, _paths = redactor.with_keys(obligation_keys(obligations)).value(arguments)
    preview = _shorten(clear)
    try:
        size = len(canonical_json(preview))
    except NotCanonicalizable:
        return None
    if size > max_bytes:
        return {TRUNCATED: f"arguments are {size} bytes as JSON, over the preview limit of {max_bytes}",
                "keys": sorted(str(k) for k in arguments)[:MAX_ITEMS]}
    return preview
