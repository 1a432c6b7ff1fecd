"""Who is calling: the verified subject of a decision and the resolvers that find it.

Every decision's subject is a SPIFFE ID that a resolver verified (Workload API,
mTLS peer, JWT-SVID) or, only when configured, a generated dev identity. A
resolver never trusts an ID the caller merely claims.

Built from config by `sidecar.identity.factory.build_identity`; the sources
live in `workload_api.py`, `mtls.py`, `jwt_svid.py` and `dev.py`, their
precedence in `composite.py`, delegation chains in `delegation.py`;
docs/identity.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Protocol

from sidecar.identity.spiffe_id import SpiffeIdError, parse_spiffe_id

log = logging.getLogger(__name__)

SOURCES = ("workload_api", "mtls", "jwt_svid", "dev")


@dataclass(frozen=True)
class Subject:
    """A verified workload identity, as it appears in policy input and evidence."""

    spiffe_id: str
    source: str
    svid_expires_at: str | None = None  # RFC 3339, UTC

    @property
    def trust_domain(self) -> str:
        return parse_spiffe_id(self.spiffe_id).trust_domain

    @property
    def path(self) -> str:
        return parse_spiffe_id(self.spiffe_id).path

    def to_input(self) -> dict:
        return {
            "spiffe_id": self.spiffe_id,
            "trust_domain": self.trust_domain,
            "path": self.path,
            "source": self.source,
            "svid_expires_at": self.svid_expires_at,
        }


@dataclass(frozen=True)
class CallerIdentity:
    """The caller and the agents upstream of it (outermost first)."""

    subject: Subject
    delegation: tuple[Subject, ...] = ()


# The entries of grpc's auth context that identity reads (mtls.py; mcp/tls.py writes the same keys):
# a front door copies only these per call (a TLS call's context has a dozen, PEM certificates among them).
PEER_AUTH_KEYS = ("transport_security_type", "x509_pem_cert", "x509_pem_cert_chain", "peer_spiffe_id")


@dataclass(frozen=True)
class PeerInfo:
    """What a transport tells about a caller, independent of grpcio."""

    transport: str  # "unix", "tcp" or "tls"
    metadata: Mapping[str, str] = field(default_factory=dict)
    auth_context: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict)  # PEER_AUTH_KEYS entries


class IdentityError(Exception):
    """The caller could not be verified; the call is denied with this reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class IdentityResolver(Protocol):
    """Turns what the transport tells into a verified caller, or raises IdentityError."""

    def resolve(self, peer: PeerInfo) -> CallerIdentity: ...

    def health(self) -> tuple[bool, str]:
        """(serving, detail): False until the resolver can verify anyone."""
        ...


def resolve_caller(resolver: IdentityResolver, peer: PeerInfo) -> CallerIdentity | IdentityError:
    """The verified caller, or the reason there is none; never raises.

    Every front door (gRPC, the MCP gateway, the Approvals API) resolves through this, so a
    resolver bug denies the call (logged) instead of crashing it."""
    try:
        return resolver.resolve(peer)
    except IdentityError as exc:
        return exc
    except Exception as exc:
        log.exception("identity resolver failed")
        return IdentityError(f"identity could not be verified ({type(exc).__name__})")


__all__ = [
    "SOURCES",
    "CallerIdentity",
    "IdentityError",
    "IdentityResolver",
    "PeerInfo",
    "SpiffeIdError",
    "Subject",
    "parse_spiffe_id",
    "resolve_caller",
]
