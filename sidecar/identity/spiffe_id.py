"""Strict SPIFFE ID parsing.

py-spiffe's SpiffeId lowercases instead of rejecting, has no length limit and
accepts a trailing newline, so every ID that enters the sidecar (config,
tokens, certificates, CLI) goes through here first. Rules from the SPIFFE ID
specification: scheme `spiffe://`, trust domain of lowercase letters, digits,
dots, dashes and underscores, path segments of letters, digits, dots, dashes
and underscores (no empty, `.` or `..` segments), no query or fragment, at
most 2048 bytes in all and 255 bytes of trust domain.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[a-zA-Z0-9._-]+")


class SpiffeIdError(ValueError):
    """Not a valid SPIFFE ID; the message says which rule it breaks."""


@dataclass(frozen=True)
class SpiffeIdParts:
    trust_domain: str
    path: str


def parse_spiffe_id(value: object) -> SpiffeIdParts:
    """The trust domain and path of a SPIFFE ID; SpiffeIdError naming the broken rule."""
    if not isinstance(value, str):
        raise SpiffeIdError("SPIFFE ID must be a string")
    return _parse(value)


# Every call parses its caller's ID (and its chain's) again: the answers are remembered
# (a valid ID's parts are immutable; an error is raised again each time, never cached).
@functools.lru_cache(maxsize=4096)
def _parse(value: str) -> SpiffeIdParts:
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
    if not value.startswith("spiffe://"):
        raise SpiffeIdError("SPIFFE ID must start with spiffe://")
    rest = value[len("spiffe://"):]
    trust_domain, slash, path = rest.partition("/")
    if not trust_domain:
        raise SpiffeIdError("SPIFFE ID has an empty trust domain")
    if len(trust_domain) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise SpiffeIdError(
            "trust domain may hold only lowercase letters, digits, '.', '-' and '_'"
        )
    if not slash:
        return SpiffeIdParts(trust_domain, "")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise SpiffeIdError("SPIFFE ID path has an empty, '.' or '..' segment")
        if not _SEGMENT.fullmatch(segment):
            raise SpiffeIdError(
                "SPIFFE ID path segments may hold only letters, digits, '.', '-' and '_'"
            )
    return SpiffeIdParts(trust_domain, "/" + path)


def validate_spiffe_id(value: object) -> str:
    """Return the ID unchanged if it is valid; raise SpiffeIdError otherwise."""
    parse_spiffe_id(value)
    return value  # type: ignore[return-value]


def validate_workload_id(value: object) -> SpiffeIdParts:
    """A SPIFFE ID that names a workload: valid and with a path.

    `spiffe://example.org` alone names the trust domain itself (its CA), never a
    workload, so it is refused as the subject of a call.
    """
    parts = parse_spiffe_id(value)
    if not parts.path:
        raise SpiffeIdError("SPIFFE ID names only a trust domain, not a workload (it has no path)")
    return parts


def validate_trust_domain(value: object) -> str:
    """A bare trust domain name (`example.org`), as it appears in config."""
    if not isinstance(value, str):
        raise SpiffeIdError("trust domain must be a string")
    if not value:
        raise SpiffeIdError("trust domain is empty")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _TRUST_DOMAIN.fullmatch(value):
        raise SpiffeIdError("trust domain may hold only lowercase letters, digits, '.', '-' and '_'")
    return value
