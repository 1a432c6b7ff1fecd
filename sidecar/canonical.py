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

Speed: `rfc8785` is pure Python (about 200 µs for a decision record). Values
made only of plain JSON types whose RFC 8785 form orjson writes byte for byte
(`plain_form`: sorted keys, the same string escapes, integers within 2^53 - 1,
floats written the same in both) are serialized by orjson instead; anything
else takes the `rfc8785` path. tests/test_evidence_canonical.py checks that
both paths give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import orjson
import rfc8785

# Deepest nesting of arrays/objects written: far below the interpreter's recursion
# limit, so every reader (json's C decoder included) reads back what was written.
MAX_DEPTH = 256
_INT_MAX = 2**53 - 1
_INFINITY = float("inf")
# A JSON string in canonical output (control characters are always escaped there).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
# Outside strings: an integer literal of 16 or more digits (not part of a fraction or exponent).
_LONG_INTEGER = re.compile(rb"(?<![\d.eE+])-?(\d{16,})(?![\d.eE])")
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")


class NotCanonicalizable(ValueError):
    """The value has no canonical JSON form (NaN, an integer past 2^53, a non-string key...)."""


def canonical_json(value: Any) -> bytes:
    """RFC 8785 bytes of `value`; NotCanonicalizable when no reader would get them back unchanged."""
    fast = plain_form(value)
    if fast is not None:
        return fast[0]
    try:
        out = rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise NotCanonicalizable(str(exc)) from None
    except RecursionError:
        raise NotCanonicalizable(f"nested deeper than {MAX_DEPTH} levels") from None
    _check_readable(out)
    return out


def plain_form(value: Any) -> tuple[bytes, int] | None:
    """(RFC 8785 bytes, nesting depth) of a plain value (`plain_depth`), written by orjson; None
    when `value` is not plain or orjson's bytes are not its RFC 8785 form (the rfc8785 path decides).

    A caller that must check a value anyway (calls.check_call) learns from one walk that no
    number rule is broken and how deep it nests, and gets the bytes it digests.

    Strings need no check: both escape exactly `"`, `\\` and U+0000-U+001F, the same way
    (RFC 8785 section 3.2.2.2), and orjson refuses lone surrogates. Keys sort the same (code
    points versus RFC 8785's UTF-16 code units, section 3.2.3) unless a key set mixes
    U+E000-U+FFFF with characters past U+FFFF: such output is not used.
    """
    depth = plain_depth(value)
    if depth is None:
        return None
    try:
        out = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, ValueError):  # orjson.JSONEncodeError: lone surrogate, nesting
        return None
    if (b"\xee" in out or b"\xef" in out) and any(lead in out for lead in _ASTRAL_LEADS):
        return None  # U+E000-U+FFFF and past U+FFFF: code point and UTF-16 orders may differ
    return out, depth


def plain_depth(value: Any) -> int | None:
    """The nesting depth of a plain JSON value (a scalar 0, `{}` 1, `[[]]` 2), or None when it is not plain.

    Plain: exact dict (str keys), list, str, bool, None, int within 2^53 - 1, and floats
    that orjson and RFC 8785 (ECMAScript Number::toString, RFC 8785 section 3.2.2.3) write
    alike: finite and not integer-valued (ECMAScript writes `1` for 1.0 and `1e+21`, orjson
    `1.0` and `1e21`), and not in [1e-6, 1e-5) (ECMAScript `0.000001`, orjson `1e-6`). Both
    print the same shortest round-trip digits, in plain decimal from 1e-5 on and as
    `de-N` below 1e-6. Nested less than _FAST_DEPTH deep. So a plain value breaks no
    number rule (jsonvalues.py: nothing to refuse, nothing to normalize) and orjson writes
    it as RFC 8785 does (tests/test_evidence_canonical.py checks floats of every magnitude).
    One walk, at C-loop speed for the common shapes.
    """
    deepest = 0
    # Containers still to see and their depths, in two lists: no tuple per container, so a
    # large value makes no garbage for the collector to chase through it.
    stack: list = [[value]]
    depths = [0]
    while stack:
        node = stack.pop()
        depth = depths.pop()
        if type(node) is dict:
            for key in node:
                if type(key) is not str:
                    return None
            node = node.values()
        for item in node:  # scalars are judged in place: only containers go on the stack
            kind = type(item)
            if kind is str or kind is bool or item is None:
                continue
            if kind is int:
                if not -_INT_MAX <= item <= _INT_MAX:
                    return None
            elif kind is float:
                magnitude = abs(item)
                if not magnitude < _INFINITY or item.is_integer() or 1e-6 <= magnitude < 1e-5:  # NaN fails `<`
                    return None
            elif kind is dict or kind is list:
                if depth >= _FAST_DEPTH:  # deeper (or a cycle): the rfc8785 path refuses it with a reason
                    return None
                stack.append(item)
                depths.append(depth + 1)
                if depth >= deepest:
                    deepest = depth + 1
            else:
                return None
    return deepest


_FAST_DEPTH = 64  # nesting the fast path walks; orjson itself stops at 254
_ASTRAL_LEADS = (b"\xf0", b"\xf1", b"\xf2", b"\xf3", b"\xf4")  # UTF-8 lead bytes of characters past U+FFFF


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
