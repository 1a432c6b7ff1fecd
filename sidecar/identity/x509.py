"""X.509-SVID checks the sidecar makes itself, on top of what TLS and py-spiffe do.

- `svid_spiffe_id`: the one URI SAN of a leaf, strictly validated (py-spiffe
  lowercases; grpc leaves `peer_spiffe_id` unset with two URI SANs).
- `chains_to`: whether a peer chain ends at an authority of one trust domain's
  bundle. grpc verifies a peer against the union of every trusted bundle, so
  with federation a CA of one trust domain could vouch for another's IDs; this
  closes that.
- `rfc3339` / `expires_at`: the `svid_expires_at` format in policy input.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from sidecar.identity.spiffe_id import SpiffeIdError, SpiffeIdParts, validate_workload_id

PEM = serialization.Encoding.PEM
MAX_CHAIN = 8


class SvidError(ValueError):
    """The certificate is not a usable X.509-SVID; the message says why."""


def shorten(value: str, limit: int = 96) -> str:
    """A value safe to put in a reason: repr'd and cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f"({len(value)} chars)"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def not_after(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def svid_spiffe_id(cert: x509.Certificate) -> SpiffeIdParts:
    """The SPIFFE ID of an X.509-SVID leaf: exactly one URI SAN, a valid workload ID."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise SvidError(f"an X.509-SVID has exactly one URI SAN; this certificate has {len(uris)}")
    try:
        parts = validate_workload_id(uris[0])
    except SpiffeIdError as exc:
        raise SvidError(f"URI SAN {shorten(uris[0])} is not a valid SPIFFE ID: {exc}") from None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.ca:
            raise SvidError("an X.509-SVID leaf must not be a CA certificate")
    except x509.ExtensionNotFound:
        pass
    # A certificate that may sign certificates or CRLs is an authority whatever its basic constraints say
    # (X.509-SVID spec section 4.3: a leaf sets neither keyCertSign nor cRLSign).
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if usage.key_cert_sign or usage.crl_sign:
            raise SvidError("an X.509-SVID leaf must not be able to sign certificates (keyCertSign or cRLSign)")
    except x509.ExtensionNotFound:
        pass
    return parts


def load_pem_chain(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise SvidError(f"cannot parse the certificate chain: {exc}") from None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def chains_to(chain: Sequence[x509.Certificate], authorities: Iterable[x509.Certificate]) -> bool:
    """True when the chain (leaf first) leads, signature by signature, to one of `authorities`.

    This is not full path validation (TLS already did that against all trusted
    roots); it only pins which bundle the path ends in.
    """
    roots = list(authorities)
    if not chain or not roots:
        return False
    current = chain[0]
    intermediates = list(chain[1:])
    for _ in range(MAX_CHAIN):
        if any(current == root or _issued_by(current, root) for root in roots):
            return True
        nxt = next((c for c in intermediates if _issued_by(current, c)), None)
        if nxt is None:
            return False
        intermediates.remove(nxt)
        current = nxt
    return False


def certs_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(PEM) for c in certs)
