"""Canonical JSON (RFC 8785) and the sha256 digests built on it: one form for writing and reading.

The same bytes for the same value everywhere: argument digests, evidence
hashes, escalation fingerprints. `canonical_json` (the writer) accepts a
value only when `parse_json` (the reader) gets back a value with the very
same canonical bytes, so whatever is sealed can be verified:

    canonical_json(parse_json(canonical_json(v))) == canonical_json(v)   for every v it accepts

RFC 8785 numbers are IEEE 754 doubles, and a JSON reader turns an integer
literal into an integer; RFC 8785 (and its `rfc8785` implementation) refuses
integers past 2^53 - 1. So besides what the RFC itself refuses (NaN and
Infinity, integers past 2^53 - 1, lone surrogates, non-string keys, other
types), the writer refuses floats that serialize as integer literals past
2^53 - 1 (1e20 is written `100000000000000000000`, which no reader gets back
as a canonicalizable value) and nesting deeper than MAX_DEPTH.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import rfc8785

# Deepest nesting of arrays/objects written: far below the interpreter's recursion
# limit, so every reader (json's C decoder included) reads back what was written.
MAX_DEPTH = 256
_INT_MAX = 2**53 - 1
# A JSON string in canonical output (control characters are always escaped there).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
# Outside strings: an integer literal of 16 or more digits (not part of a fraction or exponent).
_LONG_INTEGER = re.compile(rb"(?<![\d.eE+])-?(\d{16,})(?![\d.eE])")
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")


class NotCanonicalizable(ValueError):
    """The value has no canonical JSON form (NaN, an integer past 2^53, a non-string key...)."""


def canonical_json(value: Any) -> bytes:
    """RFC 8785 bytes of `value`; NotCanonicalizable when no reader would get them back unchanged."""
    try:
        out = rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise NotCanonicalizable(str(exc)) from None
    except RecursionError:
        raise NotCanonicalizable(f"nested deeper than {MAX_DEPTH} levels") from None
    _check_readable(out)
    return out


def _check_readable(out: bytes) -> None:
    if len(out) < 16:
        return
    bare = _STRING.sub(b'""', out) if b'"' in out else out
    for digits in _LONG_INTEGER.findall(bare):
        if int(digits) > _INT_MAX:
            raise NotCanonicalizable(
                f"a float past 2^53 - 1 serializes as a {len(digits)}-digit integer that a JSON reader "
                "cannot get back (RFC 8785 numbers are IEEE 754 doubles)"
            )
    brackets = bare.translate(None, _BRACKETS)
    if len(brackets) > 2 * MAX_DEPTH:
        depth = 0
        for byte in brackets:
            depth += 1 if byte in b"[{" else -1
            if depth > MAX_DEPTH:
                raise NotCanonicalizable(f"nested deeper than {MAX_DEPTH} levels")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:80]!r}")
            seen.add(key)
    return out


def parse_json(data: bytes | str) -> Any:
    """The reader's side: strict JSON (no NaN/Infinity, no repeated keys); ValueError when not."""
    try:
        return json.loads(data, parse_constant=_refuse_constant, object_pairs_hook=_refuse_duplicates)
    except RecursionError:
        raise ValueError("nested too deep to read") from None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
