"""Obligations applied to a call's arguments before it leaves the sidecar.

Policy returns obligations with its decision (`data.sidecar.decision.obligations`).
Those that shape the call are applied here, to top-level argument names:

    drop_arguments:       [name, ...]        the argument is removed
    redact_call_arguments: [name, ...]       its value becomes "[REDACTED]"
    clamp_arguments:      {name: max, ...}   a number above max becomes max
    cap_list_arguments:   {name: n, ...}     a list longer than n keeps its first n items

`record_arguments` and `redact_arguments` are about what evidence and
approvers show (docs/evidence.md); they are known and leave the call alone.
Any other key, a malformed value, an obligation that does not fit the
argument (clamping a string), or an argument spelled as a named one but for
case or compatibility forms (`LIMIT`, a fullwidth `ｌｉｍｉｔ`, which tools that
read names without case take for `limit`) raises ObligationError: the call is
not made (fail closed). A named argument that is absent is left absent.
"""

from __future__ import annotations

import copy
from typing import Any

from sidecar.calls import folded_name
from sidecar.reasons import OBLIGATION_INAPPLICABLE, OBLIGATION_UNKNOWN, Reason

REDACTED = "[REDACTED]"
DISPLAY_OBLIGATIONS = ("record_arguments", "redact_arguments")
CALL_OBLIGATIONS = ("drop_arguments", "redact_call_arguments", "clamp_arguments", "cap_list_arguments")


class ObligationError(Exception):
    """The obligations cannot be applied; `reason` is "<code>: <text>"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _names(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ObligationError(str(Reason(OBLIGATION_UNKNOWN, f"obligation {key} must be a list of argument names")))
    return value


def _limits(key: str, value: Any, *, integer: bool) -> dict[str, float]:
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool)
        and (not integer or (float(v).is_integer() and v >= 0))
        for k, v in value.items()
    )
    if not ok:
        kind = "non-negative integers" if integer else "numbers"
        raise ObligationError(str(Reason(OBLIGATION_UNKNOWN, f"obligation {key} must map argument names to {kind}")))
    return value


def _check_spellings(arguments: dict[str, Any], named: list[str]) -> None:
    """Refuse a call with an argument that is another spelling of one an obligation names (`LIMIT`,
    a fullwidth `ｌｉｍｉｔ` for `limit`): many tools read names without case, some after NFKC
    folding, so the obligation would leave the argument the tool reads untouched."""
    folded = {folded_name(name): name for name in named}
    for key in arguments:
        name = folded.get(folded_name(key)) if isinstance(key, str) else None
        if name is not None and key != name:
            raise ObligationError(str(Reason(
                OBLIGATION_INAPPLICABLE,
                f"argument {key!r} is another spelling of {name!r}, which the obligations name; a tool that "
                "reads names without case would get it unchanged, so the call was not made",
            )))


def apply_obligations(arguments: dict[str, Any], obligations: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """Return (arguments to send, changes made). Never modifies `arguments`.

    Each change is {"argument", "action": dropped|redacted|clamped|capped, ...}
    with `to` for clamped and `from_length`/`to_length` for capped.
    Raises ObligationError (fail closed) as described in the module docstring.
    """
    unknown = sorted(k for k in obligations if k not in DISPLAY_OBLIGATIONS + CALL_OBLIGATIONS)
    if unknown:
        raise ObligationError(str(Reason(
            OBLIGATION_UNKNOWN,
            f"policy asked for obligation(s) {', '.join(unknown)} that this sidecar "
            "cannot apply; the call was not made",
        )))
    _check_spellings(arguments, [
        *_names("drop_arguments", obligations.get("drop_arguments", [])),
        *_names("redact_call_arguments", obligations.get("redact_call_arguments", [])),
        *_limits("clamp_arguments", obligations.get("clamp_arguments", {}), integer=False),
        *_limits("cap_list_arguments", obligations.get("cap_list_arguments", {}), integer=True),
    ])
    out = copy.deepcopy(arguments)
    changes: list[dict] = []
    for name in _names("drop_arguments", obligations.get("drop_arguments", [])):
        if name in out:
            del out[name]
            changes.append({"argument": name, "action": "dropped"})
    for name in _names("redact_call_arguments", obligations.get("redact_call_arguments", [])):
        if name in out:
            out[name] = REDACTED
            changes.append({"argument": name, "action": "redacted"})
    for name, limit in _limits("clamp_arguments", obligations.get("clamp_arguments", {}), integer=False).items():
        if name not in out:
            continue
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ObligationError(
                str(Reason(
                    OBLIGATION_INAPPLICABLE,
                    f"clamp_arguments names {name!r}, which is not a number; the call was not made",
                ))
            )
        if value > limit:
            out[name] = limit
            changes.append({"argument": name, "action": "clamped", "to": limit})
    for name, limit in _limits("cap_list_arguments", obligations.get("cap_list_arguments", {}), integer=True).items():
        if name not in out:
            continue
        value = out[name]
        if not isinstance(value, list):
            raise ObligationError(
                str(Reason(
                    OBLIGATION_INAPPLICABLE,
                    f"cap_list_arguments names {name!r}, which is not a list; the call was not made",
                ))
            )
        if len(value) > limit:
            out[name] = value[: int(limit)]
            changes.append({"argument": name, "action": "capped", "from_length": len(value), "to_length": int(limit)})
    return out, changes
