"""The evidence record format: kinds, hashing, file names, and DecisionEvent → record.

One record is one line of canonical JSON (RFC 8785: sorted keys, no spaces),
terminated by a newline. Every record carries

    kind       decision | escalation | approval | human_denial | expiry |
               invocation | task_end | checkpoint | startup
    seq        1, 2, 3, ... with no gaps, across all files of the log
    prev_hash  the `hash` of the record before (GENESIS for seq 1)
    logged_at  RFC 3339 time the writer put it in the log
    hash       "sha256:<hex>" of the canonical JSON of the record without `hash`

and the fields of its kind. Everything here is pure (no I/O) so the writer,
the verifier and the shipper agree on it by construction.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.canonical import MAX_DEPTH, NotCanonicalizable, canonical_json, sha256_digest
from sidecar.evidence.redaction import digest
from sidecar.reasons import parse

if TYPE_CHECKING:
    from sidecar.evidence import DecisionEvent

KINDS = (
    "decision", "escalation", "approval", "human_denial", "expiry", "invocation", "task_end", "checkpoint", "startup"
)
# Every `outcome` a record holds: a decision's (and its invocation's, escalation's), then an escalation's
# end: `approval` approved, `human_denial` denied, `expiry` expired, a refused approve/deny refused.
OUTCOMES = ("allow", "deny", "escalate", "approved", "denied", "expired", "refused")
# Kinds that describe a tool call and so become an execute_tool span.
CALL_KINDS = ("decision", "escalation", "approval", "human_denial", "expiry", "invocation")
GENESIS = "sha256:" + "0" * 64
FILE_PATTERN = re.compile(r"^evidence-(\d{6})\.jsonl$")
SHIP_STATE_NAME = "ship-state.json"

ARGUMENT_MODES = ("digest", "policy", "clear")


def file_name(index: int) -> str:
    return f"evidence-{index:06d}.jsonl"


def beside(directory: str | Path, suffix: str) -> Path:
    """A path next to the evidence directory, never inside it: `var/evidence` → `var/evidence<suffix>`.

    Whoever can rewrite the log's directory must not thereby hold the checkpoint
    key or the checkpoint mirror as well.
    """
    path = Path(os.path.abspath(directory))
    return path.with_name(path.name + suffix)


def default_mirror_path(directory: str | Path) -> Path:
    """Where checkpoints are mirrored when `evidence.checkpoint_mirror` is "": `<dir>-checkpoints.jsonl`."""
    return beside(directory, "-checkpoints.jsonl")


def dev_key_path(directory: str | Path) -> Path:
    """The generated development checkpoint key: `<dir>-dev-key.pem` (public half `<dir>-dev-key.pub.pem`)."""
    return beside(directory, "-dev-key.pem")


def rfc3339(ts: float | None = None) -> str:
    moment = datetime.now(timezone.utc) if ts is None else datetime.fromtimestamp(ts, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_rfc3339(value: str) -> datetime:
    """Parse an RFC 3339 time (Z or offset); naive times are taken as UTC."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment


def record_hash(record: dict) -> str:
    """sha256 over the canonical JSON of the record without its `hash`."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return sha256_digest(canonical_json(body))


def seal(record: dict) -> bytes:
    """Add `hash` to a record that has everything else; return its line (canonical JSON with newline).

    The record is serialized once, as the members that sort before `hash` and those after it
    (RFC 8785 section 3.2.3 sorts keys by UTF-16 code units, which order every string against
    the ASCII "hash" as code points do); the hash covers both joined, and the line has `hash`
    between them: the same bytes as canonical_json of the whole record, at half the cost.
    NotCanonicalizable when the record has no canonical form (canonical.py).
    """
    record.pop("hash", None)
    if any(type(key) is not str for key in record):
        raise NotCanonicalizable("record keys must be strings")
    before = canonical_json({k: v for k, v in record.items() if k < "hash"})[1:-1]
    after = canonical_json({k: v for k, v in record.items() if k > "hash"})[1:-1]
    record["hash"] = sha256_digest(b"{" + b",".join(part for part in (before, after) if part) + b"}")
    member = b'"hash":"' + record["hash"].encode() + b'"'
    return b"{" + b",".join(part for part in (before, member, after) if part) + b"}\n"


def reason_code(reason: str) -> str:
    """The low-cardinality part of a reason (sidecar/reasons.py), "other" for a reason without a code."""
    parsed = parse(reason)
    return parsed.code if parsed is not None else "other"


def recordable(value: Any) -> Any:
    """`value` itself when it has a canonical JSON form; else a copy in which each part that has none
    (a NaN, 1e20, a lone surrogate, a non-string key, nesting past MAX_DEPTH, another type) is
    replaced by `{"unrecordable": "<why>", "repr_digest": "sha256:<of its Python repr>"}`.

    The result always has a canonical form: a record built from it can be sealed and verified.
    """
    try:
        canonical_json(value)
        return value
    except NotCanonicalizable:
        return _recordable(value, 1)


def _unrecordable(value: Any, why: str) -> dict:
    return {
        "unrecordable": why[:200],
        "repr_digest": sha256_digest(repr(value).encode("utf-8", "backslashreplace")),
    }


def _recordable(node: Any, depth: int) -> Any:
    if isinstance(node, (dict, list, tuple)):
        if depth >= MAX_DEPTH:
            return _unrecordable(node, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            out = {}
            for key, child in node.items():
                try:
                    if not isinstance(key, str):
                        raise NotCanonicalizable("object keys must be strings")
                    canonical_json(key)
                except NotCanonicalizable:
                    key = "[unrecordable key " + sha256_digest(repr(key).encode("utf-8", "backslashreplace")) + "]"
                out[key] = _recordable(child, depth + 1)
            return out
        return [_recordable(child, depth + 1) for child in node]
    try:
        canonical_json(node)
        return node
    except NotCanonicalizable as exc:
        return _unrecordable(node, str(exc))


def arguments_in_clear(event: "DecisionEvent", mode: str) -> bool:
    if mode == "clear":
        return True
    if mode == "policy":
        return (event.obligations or {}).get("record_arguments") is True
    return False


def decision_fields(
    event: "DecisionEvent",
    *,
    arguments_mode: str = "policy",
    tool_known: bool = False,
) -> dict:
    """The fields of a `decision` record (the writer redacts them and adds kind, seq, prev_hash, logged_at, hash)."""
    identity = event.identity
    subject = None
    delegation: list[dict] = []
    if identity is not None:
        subject = {
            "spiffe_id": identity.subject.spiffe_id,
            "source": identity.subject.source,
            "svid_expires_at": identity.subject.svid_expires_at,
        }
        delegation = [
            {"spiffe_id": d.spiffe_id, "source": d.source, "svid_expires_at": d.svid_expires_at}
            for d in identity.delegation
        ]
    fields: dict[str, Any] = {
        "time": event.time,
        "decision_id": event.decision_id,
        "call_id": event.call_id,
        "subject": subject,
        "delegation": delegation,
        "tool": event.tool,
        "tool_known": bool(tool_known),
        "server": event.server,
        "arguments_digest": event.arguments_digest,
        "task_id": event.task_id,
        "intent": event.intent,
        "signals": event.signals,
        "outcome": event.outcome,
        "reasons": list(event.reasons),
        "obligations": dict(event.obligations or {}),
        "policy_revision": event.policy_revision,
        "engine": event.engine,
        "engine_error": event.engine_error,
        "escalation_id": event.escalation_id,
        "approver": event.approver,
        "trace_id": event.trace.trace_id,
        "span_id": event.trace.span_id,
        "parent_span_id": event.trace.parent_span_id,
        "sidecar": event.sidecar,
    }
    if event.engine_decision_id:
        fields["engine_decision_id"] = event.engine_decision_id
    engine_ms = (event.timings_ms or {}).get("engine")
    if isinstance(engine_ms, (int, float)):
        fields["engine_ms"] = round(float(engine_ms), 3)
    in_clear = arguments_in_clear(event, arguments_mode)
    if event.input_document is not None:
        fields["input"] = replay_input(event.input_document, arguments_in_clear=in_clear)
    if event.policy_decision is not None:
        fields["policy_decision"] = event.policy_decision
    if event.shadow is not None:
        fields["shadow"] = event.shadow
    if in_clear and isinstance(event.arguments, dict):
        try:
            canonical_json(event.arguments)
        except NotCanonicalizable:
            pass  # malformed arguments are only ever recorded as their digest
        else:
            fields["arguments"] = event.arguments  # redacted by the log's Redactor, like every field
    # a value with no canonical form (the call was denied for it) is described, never written:
    # the writer replaces it with recordable() when sealing fails
    return fields


# Leaves digested one by one at most; past this, the value is one digest of the whole. A digest
# (71 characters) for every number of a megabyte of small ones made a record twelve times the call.
MAX_DIGESTED_LEAVES = 1024


def replay_input(document: dict, *, arguments_in_clear: bool) -> dict:
    """The policy input as a decision record keeps it (`input`, for `agent-sidecar policy replay`).

    `tool.arguments` and `tool.facts` are in clear exactly when the record's
    `arguments` are (arguments_in_clear); otherwise every scalar in them (string,
    number, boolean, null) becomes `digest()` of it, keys and list lengths kept, or,
    past MAX_DIGESTED_LEAVES scalars, the whole value becomes one `digest()` (the
    record's `arguments_digest`, for the arguments). The writer then applies the one
    rule set with digests for what it picks (redaction.py, rule 3). docs/evidence.md
    says what a replay can reproduce.
    """
    if arguments_in_clear:
        return document
    tool = document.get("tool")
    if not isinstance(tool, dict):
        return document
    tool = dict(tool)
    for key in ("arguments", "facts"):
        if key in tool:
            value = tool[key]
            tool[key] = digest(value) if _more_leaves_than(value, MAX_DIGESTED_LEAVES) else _digest_leaves(value)
    return {**document, "tool": tool}


def _more_leaves_than(value: Any, limit: int) -> bool:
    """Does `value` hold more than `limit` scalars? (Stops counting past it.)"""
    count = 0
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        else:
            count += 1
            if count > limit:
                return True
    return False


def _digest_leaves(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _digest_leaves(child) for key, child in node.items()}
    if isinstance(node, (list, tuple)):
        return [_digest_leaves(child) for child in node]
    return digest(node)


def derived_id(seed: str, hex_digits: int) -> str:
    """A deterministic non-zero hex id, so re-exported spans keep identical ids."""
    digest = hashlib.sha256(seed.encode()).hexdigest()[:hex_digits]
    return digest if int(digest, 16) else "1".rjust(hex_digits, "0")
