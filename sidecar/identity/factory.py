"""Build the identity stage from `identity:` config: one call for server.py.

    runtime = build_identity(config.identity)
    resolver, tls = runtime            # or runtime.resolver, runtime.server_credentials
    server = grpc.aio.server(options=runtime.grpc_options)
    if tls is not None:
        server.add_secure_port(config.listen.tcp, tls)     # the mTLS listener
    ...
    runtime.close()                    # on shutdown

`build_identity` never blocks: the Workload API is watched in the
background and `resolver.health()` reports NOT serving until an SVID is
held; calls meanwhile are denied with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import grpc

from sidecar.identity import IdentityResolver
from sidecar.identity.composite import CompositeResolver, DevSource
from sidecar.identity.delegation import DelegationVerifier
from sidecar.identity.dev import DevIdentityResolver
from sidecar.identity.jwt_svid import MAX_TOKEN_BYTES, JwtSvidResolver, JwtSvidValidator
from sidecar.identity.mtls import MtlsResolver, SvidServerCredentials
from sidecar.identity.workload_api import SvidUnavailable, WorkloadApiResolver, WorkloadApiSource

# grpc refuses metadata over 8 KiB by default (RESOURCE_EXHAUSTED before the
# servicer runs, so nothing is recorded). Room for an 8 KiB token plus a
# delegation chain, so an oversized token reaches the resolver and is denied
# with a reason and recorded.
MAX_METADATA_BYTES = 64 * 1024
GRPC_SERVER_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.max_metadata_size", MAX_METADATA_BYTES),)

@dataclass
class IdentityRuntime:
    """The resolver, the mTLS credentials (None when mtls is not configured), and what to close."""

    resolver: IdentityResolver
    server_credentials: grpc.ServerCredentials | None = None
    source: WorkloadApiSource | None = None
    grpc_options: tuple[tuple[str, int], ...] = field(default=GRPC_SERVER_OPTIONS)

    def __iter__(self) -> Iterator:
        """`resolver, server_credentials = build_identity(...)` works too."""
        return iter((self.resolver, self.server_credentials))

    def own_spiffe_ids(self) -> frozenset[str]:
        """The SPIFFE IDs of the X.509-SVIDs the Workload API gives the sidecar now (its own first, then
        any other registration matching it); empty in dev mode or while it holds none.

        With `workload_api` SPIRE registers the pod, so every container of the agent's pod can fetch
        these identities (as X.509- or JWT-SVIDs) from its own Workload API: they are the agent's too."""
        if self.source is None:
            return frozenset()
        try:
            held = self.source.x509()
        except SvidUnavailable:
            return frozenset()
        return frozenset((held.spiffe_id, *held.also))

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def build_identity(identity_config, *, source: WorkloadApiSource | None = None) -> IdentityRuntime:
    """Compose the resolvers named in `identity_config.sources`, in that precedence.

    `source` lets tests hand in an already-built WorkloadApiSource.
    """
    sources = list(identity_config.sources)
    if sources == ["dev"]:
        return IdentityRuntime(CompositeResolver([DevSource(DevIdentityResolver(identity_config.dev_spiffe_id))]))
    if "dev" in sources:
        raise ValueError("identity.sources: 'dev' cannot be combined with a real identity source")

    trust_domains = tuple(identity_config.trust_domains)
    jwt_audience = identity_config.jwt_audience
    # No fallback to jwt_audience: a delegation link must never pass as a caller's token (config refuses equal ones).
    delegation_audience = identity_config.delegation_audience
    want_jwt = "jwt_svid" in sources or bool(delegation_audience)

    if source is None:
        source = WorkloadApiSource(
            identity_config.workload_api_socket,
            jwt_bundles=want_jwt,
            answer_timeout=identity_config.workload_api_timeout_ms / 1000,
            backoff_max=identity_config.workload_api_max_backoff_ms / 1000,
        )
    source.start()

    resolvers = []
    server_credentials = None
    for name in sources:
        if name == "workload_api":
            resolvers.append(WorkloadApiResolver(source))
        elif name == "mtls":
            resolvers.append(MtlsResolver(source, trust_domains))
            server_credentials = SvidServerCredentials(source, trust_domains).credentials()
        elif name == "jwt_svid":
            if not jwt_audience:
                raise ValueError("identity.jwt_audience: required when jwt_svid is among identity.sources")
            validator = JwtSvidValidator(source, jwt_audience, trust_domains, max_bytes=MAX_TOKEN_BYTES)
            resolvers.append(JwtSvidResolver(validator, source))
        else:
            raise ValueError(f"identity.sources: unknown source {name!r}")

    delegation_validator = (
        JwtSvidValidator(source, delegation_audience, trust_domains, max_bytes=MAX_TOKEN_BYTES)
        if delegation_audience
        else None
    )
    delegation = DelegationVerifier(
        delegation_validator,
        identity_config.max_delegation_links,
        unavailable="no delegation audience is configured (identity.delegation_audience)",
    )
    resolver = CompositeResolver(resolvers, delegation)
    return IdentityRuntime(resolver, server_credentials, source)
