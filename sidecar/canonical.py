"""Canonical JSON (RFC 8785) and the sha256 digests built on it.

The same bytes for the same value everywhere: argument digests, evidence
hashes, escalation fingerprints.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785


class NotCanonicalizable(ValueError):
    """The value has no canonical JSON form (NaN, an integer past 2^53, a non-string key...)."""


def canonical_json(value: Any) -> bytes:
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise NotCanonicalizable(str(exc)) from None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
