"""Several identity sources at once, with one precedence, plus the delegation chain.

Precedence is the order of `identity.sources`. For each call the first
source that *applies* decides, and its verdict is final:

- `jwt_svid` applies when the call carries `authorization` metadata;
- `mtls` applies when the call came over mutual TLS;
- `workload_api` applies when the call came over the pod's unix socket.

A credential that is presented but fails never falls back to a weaker
source: a bad JWT on the unix socket is denied, not given the pod identity.
The recommended order, `[jwt_svid, mtls, workload_api]`, lets an explicit
credential on the call beat what the transport says.

Delegation: `x-spiffe-delegation` metadata holds the JWT-SVIDs of the agents
upstream of the caller, comma-separated, outermost first. Each is validated
like a caller's JWT-SVID (audience `identity.delegation_audience`); one bad
link denies the call, naming the link.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from sidecar.identity import CallerIdentity, IdentityError, PeerInfo, Subject
from sidecar.identity.jwt_svid import JwtSvidInvalid, JwtSvidValidator

DELEGATION_METADATA = "x-spiffe-delegation"
DEFAULT_MAX_DELEGATION_LINKS = 8


class SourceResolver(Protocol):
    source_name: str

    def applies(self, peer: PeerInfo) -> bool: ...

    def resolve(self, peer: PeerInfo) -> CallerIdentity: ...

    def health(self) -> tuple[bool, str]: ...


class DelegationVerifier:
    """Turns `x-spiffe-delegation` metadata into verified subjects, outermost first."""

    def __init__(
        self,
        validator: JwtSvidValidator | None,
        max_links: int = DEFAULT_MAX_DELEGATION_LINKS,
        unavailable: str = "no JWT bundles to verify it with (dev identity)",
    ):
        self._validator = validator
        self._max_links = max_links
        self._unavailable = unavailable

    def verify(self, metadata) -> tuple[Subject, ...]:
        raw = metadata.get(DELEGATION_METADATA)
        if raw is None:
            return ()
        tokens = [t.strip() for t in raw.split(",")]
        if not raw.strip() or any(not t for t in tokens):
            raise IdentityError(f"delegation: {DELEGATION_METADATA} must be JWT-SVIDs separated by commas, none empty")
        if self._max_links == 0:
            raise IdentityError("delegation: delegation chains are not accepted (identity.max_delegation_links is 0)")
        if len(tokens) > self._max_links:
            raise IdentityError(f"delegation: {len(tokens)} links, more than the {self._max_links} allowed")
        if self._validator is None:
            raise IdentityError(f"delegation: the chain cannot be verified here: {self._unavailable}")
        links = []
        for index, token in enumerate(tokens):
            try:
                verified = self._validator.validate(token)
            except JwtSvidInvalid as exc:
                raise IdentityError(f"delegation[{index}]: {exc}") from None
            links.append(verified.subject(source="jwt_svid"))
        return tuple(links)


class CompositeResolver:
    """Applies the configured precedence of sources, then verifies the delegation chain."""

    def __init__(self, resolvers: Sequence[SourceResolver], delegation: DelegationVerifier | None = None):
        if not resolvers:
            raise ValueError("at least one identity source is needed")
        self._resolvers = tuple(resolvers)
        self._delegation = delegation or DelegationVerifier(None)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(r.source_name for r in self._resolvers)

    def resolve(self, peer: PeerInfo) -> CallerIdentity:
        for resolver in self._resolvers:
            if resolver.applies(peer):
                identity = resolver.resolve(peer)
                break
        else:
            raise IdentityError(self._nothing_applies(peer))
        delegation = self._delegation.verify(peer.metadata)
        if delegation:
            identity = CallerIdentity(identity.subject, delegation)
        return identity

    def _nothing_applies(self, peer: PeerInfo) -> str:
        offered = f"transport {peer.transport}" + (
            ", no authorization metadata" if "authorization" not in peer.metadata else ""
        )
        return (
            f"no configured identity source applies to this call ({offered}; "
            f"configured: {', '.join(self.sources)})"
        )

    def health(self) -> tuple[bool, str]:
        details = []
        serving = True
        seen: set[str] = set()
        for resolver in self._resolvers:
            ok, detail = resolver.health()
            serving = serving and ok
            if detail not in seen:
                seen.add(detail)
                details.append(detail)
        return serving, "; ".join(details)


def _always(_: PeerInfo) -> bool:
    return True


class DevSource:
    """Adapts DevIdentityResolver to the composite (it applies to every call)."""

    source_name = "dev"

    def __init__(self, dev_resolver):
        self._dev = dev_resolver
        self.applies = _always

    def resolve(self, peer: PeerInfo) -> CallerIdentity:
        return self._dev.resolve(peer)

    def health(self) -> tuple[bool, str]:
        return self._dev.health()

