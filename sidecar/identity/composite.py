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

Two credentials the caller presents must name the same caller: when both
`jwt_svid` and `mtls` are configured and a call over mutual TLS carries a
JWT-SVID, both are verified and their SPIFFE IDs must be equal (a client
holding one workload's certificate cannot speak as another with a token).

Delegation (delegation.py): `x-spiffe-delegation` metadata holds the
JWT-SVIDs of the agents upstream of the caller, outermost first, each bound
to its place in the chain; one bad link denies the call, naming the link.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from sidecar.identity import CallerIdentity, IdentityError, PeerInfo
from sidecar.identity.delegation import DelegationVerifier

# Sources whose credentials the caller presents on the call itself; when
# several apply to one call they must agree on who is calling.
PRESENTED_CREDENTIALS = ("jwt_svid", "mtls")


class SourceResolver(Protocol):
    source_name: str

    def applies(self, peer: PeerInfo) -> bool: ...

    def resolve(self, peer: PeerInfo) -> CallerIdentity: ...

    def health(self) -> tuple[bool, str]: ...


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
        deciding = next((r for r in self._resolvers if r.applies(peer)), None)
        if deciding is None:
            raise IdentityError(self._nothing_applies(peer))
        identity = deciding.resolve(peer)
        self._check_other_credentials(peer, deciding, identity)
        delegation = self._delegation.verify(peer.metadata, identity.subject.spiffe_id)
        if delegation:
            identity = CallerIdentity(identity.subject, delegation)
        return identity

    def _check_other_credentials(self, peer: PeerInfo, deciding: SourceResolver, identity: CallerIdentity) -> None:
        if deciding.source_name not in PRESENTED_CREDENTIALS:
            return
        for other in self._resolvers:
            if other is deciding or other.source_name not in PRESENTED_CREDENTIALS or not other.applies(peer):
                continue
            second = other.resolve(peer).subject.spiffe_id  # a bad second credential denies too
            if second != identity.subject.spiffe_id:
                raise IdentityError(
                    f"{deciding.source_name} and {other.source_name} name different callers "
                    f"({identity.subject.spiffe_id} and {second}); a call's credentials must all name its caller"
                )

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

