"""`mtls`: the sidecar serves gRPC over mutual TLS with its own SVID.

Server side, `SvidServerCredentials` hands grpc the held SVID and the X.509
bundles of the accepted trust domains through
`grpc.dynamic_ssl_server_credentials`: grpc asks before every new handshake,
so a rotated SVID (or bundle) is used by new connections without a restart;
open connections keep theirs. Until the first SVID arrives the server
presents a throwaway placeholder and trusts no client CA, so every handshake
fails rather than the server failing to start.

Per call, `MtlsResolver` takes the subject from the peer certificate grpc
verified, and checks what grpc does not: exactly one URI SAN that is a
strictly valid SPIFFE ID (and agrees with grpc's `peer_spiffe_id`), a trust
domain from the accepted list, a chain that ends in *that* trust domain's
bundle (grpc checks against the union of all roots), and that the peer
certificate has not expired while its connection stayed open. All but the last
depend only on the certificate's bytes, grpc's verdict and the held SVID, so
they run once for each such combination (a new SVID or bundle checks again);
the sidecar's own SVID and the certificate's validity period are checked on
every call (docs/performance.md, "The mTLS path").
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.identity import CallerIdentity, IdentityError, PeerInfo, Subject
from sidecar.identity.workload_api import HeldSvid, SvidUnavailable, WorkloadApiSource
from sidecar.identity.x509 import (
    SvidError,
    certs_pem,
    chains_to,
    load_pem_chain,
    rfc3339,
    shorten,
    svid_spiffe_id,
    utcnow,
)

log = logging.getLogger("sidecar.identity.mtls")

_PKCS8 = serialization.PrivateFormat.PKCS8
_PEM = serialization.Encoding.PEM


def _key_pem(key) -> bytes:
    return key.private_bytes(_PEM, _PKCS8, serialization.NoEncryption())


def svid_pem(held: HeldSvid) -> tuple[bytes, bytes]:
    """(private key PEM, certificate chain PEM) of a held SVID."""
    return _key_pem(held.private_key), certs_pem(held.chain)


def bundle_pem(held: HeldSvid, trust_domains: Iterable[str]) -> bytes:
    """The X.509 authorities of the given trust domains, PEM, for a root pool."""
    return certs_pem(c for td in sorted(set(trust_domains)) for c in held.bundles.get(td, ()))


def _self_signed(common_name: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a throwaway self-signed certificate."""
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(_PEM)


def _placeholder() -> grpc.ServerCertificateConfiguration:
    """Before the first SVID: a throwaway certificate and a root nobody chains to, so every handshake fails."""
    key, cert = _self_signed("agent-sidecar (no SVID yet)")
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=cert)


_TRUST_NOBODY: bytes | None = None


def _trust_nobody() -> bytes:
    """A root pool that no client chains to (never None: grpc would fall back to system roots)."""
    global _TRUST_NOBODY
    if _TRUST_NOBODY is None:
        _TRUST_NOBODY = _self_signed("agent-sidecar (no accepted trust domain bundle)")[1]
    return _TRUST_NOBODY


class SvidServerCredentials:
    """grpc server credentials that follow the held SVID and bundles."""

    def __init__(self, source: WorkloadApiSource, trust_domains: Iterable[str] = ()):
        self._source = source
        self._trust_domains = tuple(trust_domains)  # empty: the sidecar's own
        self._lock = threading.Lock()
        self._served_version = -1

    def accepted_trust_domains(self, held: HeldSvid) -> tuple[str, ...]:
        return self._trust_domains or (held.trust_domain,)

    def _configuration(self, held: HeldSvid) -> grpc.ServerCertificateConfiguration:
        tds = self.accepted_trust_domains(held)
        missing = [td for td in tds if td not in held.bundles]
        if missing:
            log.warning("identity: no X.509 bundle for accepted trust domain(s) %s; their clients cannot connect",
                        ", ".join(missing))
        key, chain = svid_pem(held)
        roots = bundle_pem(held, tds)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots or _trust_nobody())

    def _current(self) -> HeldSvid | None:
        try:
            return self._source.x509()
        except SvidUnavailable:
            return None

    def credentials(self) -> grpc.ServerCredentials:
        held = self._current()
        if held is None:
            initial = _placeholder()
        else:
            initial = self._configuration(held)
            self._served_version = held.version
        return grpc.dynamic_ssl_server_credentials(initial, self._fetch, require_client_authentication=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # grpc calls this before every new handshake; None keeps the current one.
        try:
            held = self._current()
            with self._lock:
                if held is None or held.version == self._served_version:
                    return None
                self._served_version = held.version
            log.info("identity: mTLS now serves SVID serial %x for new connections", held.serial)
            return self._configuration(held)
        except Exception:  # an exception here would fail the handshake obscurely
            log.exception("identity: could not build the mTLS configuration; keeping the previous one")
            return None


@dataclass(frozen=True)
class _Verified:
    """What a client certificate proves, checked once for its bytes, grpc's verdict and the held SVID."""

    identity: CallerIdentity
    not_after: dt.datetime
    not_before: dt.datetime


def _first(auth_context, key: str) -> bytes | None:
    values = auth_context.get(key) or ()
    return values[0] if values else None


class MtlsResolver:
    """`mtls`: the subject is the SPIFFE ID of the verified client certificate.

    Per call only what can change between two calls on one connection is checked:
    that the sidecar holds a valid SVID, and that the client certificate is valid
    now. Everything that depends only on the certificate's bytes, grpc's verdict on
    them and the held SVID's bundles (the URI SAN, the trust domain, the chain, the
    agreement with grpc's `peer_spiffe_id`) is checked once for those inputs and
    kept, keyed by all of them, so a new SVID or bundle (a new `version`) checks again.
    """

    source_name = "mtls"
    _CACHE = 512

    def __init__(
        self,
        source: WorkloadApiSource,
        trust_domains: Iterable[str] = (),
        clock: Callable[[], dt.datetime] = utcnow,
    ):
        self._source = source
        self._trust_domains = tuple(trust_domains)
        self._clock = clock
        # (leaf PEM, chain PEM, grpc's peer_spiffe_id values, held SVID version) -> verdict; oldest dropped first
        self._cache: dict[tuple[bytes, bytes, tuple[bytes, ...], int], _Verified | str] = {}
        self._cache_lock = threading.Lock()

    def applies(self, peer: PeerInfo) -> bool:
        return peer.transport == "tls"

    def health(self) -> tuple[bool, str]:
        return self._source.health()

    def resolve(self, peer: PeerInfo) -> CallerIdentity:
        if peer.transport != "tls":
            raise IdentityError(f"mtls: the call did not come over mutual TLS (transport {peer.transport})")
        try:
            held = self._source.x509()
        except SvidUnavailable as exc:
            raise IdentityError(f"mtls: {exc.reason}") from None
        ac = peer.auth_context
        # x509_pem_cert is the peer's leaf; x509_pem_cert_chain is what else it
        # sent (on the server side OpenSSL leaves the leaf out of it).
        leaf_pem = _first(ac, "x509_pem_cert")
        if not leaf_pem:
            raise IdentityError("mtls: the caller presented no client certificate")
        key = (leaf_pem, _first(ac, "x509_pem_cert_chain") or b"", tuple(ac.get("peer_spiffe_id") or ()), held.version)
        verified = self._cache.get(key)
        if verified is None:
            verified = self._admit(key, held)
        if isinstance(verified, str):
            raise IdentityError(f"mtls: {verified}")
        now = self._clock()
        if now >= verified.not_after:
            raise IdentityError(
                f"mtls: the client certificate expired at {rfc3339(verified.not_after)} while its connection "
                "stayed open; reconnect with a fresh SVID"
            )
        if now < verified.not_before:
            raise IdentityError(f"mtls: the client certificate is not valid before {rfc3339(verified.not_before)}")
        return verified.identity

    def _admit(self, key: tuple[bytes, bytes, tuple[bytes, ...], int], held: HeldSvid) -> _Verified | str:
        leaf_pem, chain_pem, grpc_values, _ = key
        result = self._verify(leaf_pem, chain_pem, grpc_values, held)
        with self._cache_lock:
            self._cache[key] = result
            while len(self._cache) > self._CACHE:
                del self._cache[next(iter(self._cache))]
        return result

    def _verify(
        self, leaf_pem: bytes, chain_pem: bytes, grpc_values: tuple[bytes, ...], held: HeldSvid
    ) -> _Verified | str:
        try:
            leaves = load_pem_chain(leaf_pem)
            if len(leaves) != 1:
                return "the caller presented no client certificate"
            others = load_pem_chain(chain_pem) if chain_pem.strip() else []
            chain = leaves + [c for c in others if c != leaves[0]]
            parts = svid_spiffe_id(chain[0])
        except SvidError as exc:
            return f"client certificate: {exc}"
        accepted = self._trust_domains or (held.trust_domain,)
        if parts.trust_domain not in accepted:
            return f"trust domain {shorten(parts.trust_domain)} is not accepted (accepted: {', '.join(accepted)})"
        authorities = held.bundles.get(parts.trust_domain, ())
        if not chains_to(chain, authorities):
            return (
                f"the client certificate for {parts.trust_domain} does not chain to that trust domain's X.509 bundle"
            )
        spiffe_id = f"spiffe://{parts.trust_domain}{parts.path}"
        grpc_ids = [v.decode("utf-8", "replace") for v in grpc_values]
        if grpc_ids != [spiffe_id]:
            return f"the TLS layer verified SPIFFE ID {grpc_ids!r}, not the certificate's {spiffe_id!r}"
        leaf = chain[0]
        not_after = leaf.not_valid_after_utc
        subject = Subject(spiffe_id, source="mtls", svid_expires_at=rfc3339(not_after))
        return _Verified(CallerIdentity(subject), not_after, leaf.not_valid_before_utc)


def x509_source_channel_credentials(source) -> grpc.ChannelCredentials:
    """Client side: grpc channel credentials from a py-spiffe X509Source's current SVID.

    A snapshot: grpc has no dynamic client credentials, so build a new channel
    after the source rotates (see sidecar.client). The server's certificate is
    checked against the source's bundles and by hostname only (grpc cannot pin
    a server SPIFFE ID): give the sidecar's SVID a DNS SAN and pass it as
    `grpc.ssl_target_name_override`.
    """
    context = source.get_x509_context()
    svid = context.default_svid
    roots = certs_pem(a for b in context.x509_bundle_set.bundles for a in b.x509_authorities)
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=_key_pem(svid.private_key), certificate_chain=certs_pem(svid.cert_chain)
    )
