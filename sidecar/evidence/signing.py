"""Checkpoint signatures: who signs, how, and how a verifier checks it.

A checkpoint signs the canonical JSON of `{log_id, seq, head_hash, time}`.
The key is, in order of preference:

- the sidecar's X.509-SVID private key, through a `KeyProvider` the server
  wires to the identity stage (the checkpoint then carries the SVID
  certificate chain, so `evidence verify --bundle` can check it against the
  trust bundle);
- a key file from `evidence.signing_key` (PEM, Ed25519 or EC or RSA);
- in dev, an Ed25519 key generated next to the evidence directory, never in
  it (`var/evidence-dev-key.pem`; said so in the log and in every checkpoint:
  `source: dev`). It protects against accidents, not against whoever can
  write where it lives.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from sidecar.canonical import canonical_json, sha256_digest

log = logging.getLogger(__name__)

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class SigningError(Exception):
    pass


@dataclass(frozen=True)
class SigningKey:
    """A private key for checkpoints; `certificates` is the SVID chain (leaf first) when it is one."""

    private_key: Any
    source: str  # svid | file | dev
    certificates: tuple[x509.Certificate, ...] = field(default=())


# Returns the current key (the SVID rotates), or None while none is available.
KeyProvider = Callable[[], "SigningKey | None"]


def svid_key_provider(source: Any) -> KeyProvider:
    """A KeyProvider over the identity stage's SVID source.

    `source.x509()` must return the current SVID (an object with `private_key`
    and `chain`, leaf first) or raise while there is none; checkpoints are then
    postponed, never signed with something else.
    """

    def provide() -> SigningKey | None:
        try:
            held = source.x509()
        except Exception as exc:
            log.warning("evidence: no SVID to sign the checkpoint with (%s)", exc)
            return None
        return SigningKey(held.private_key, "svid", tuple(held.chain))

    return provide


def public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(public_key: Any) -> str:
    return sha256_digest(public_der(public_key))


def algorithm(key: Any) -> str:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return "ecdsa-sha256"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "rsa-pkcs1v15-sha256"
    raise SigningError(f"unsupported key type {type(key).__name__} (use Ed25519, EC or RSA)")


def sign_payload(signing_key: SigningKey, payload: dict) -> tuple[dict, dict]:
    """Return (signature, signer) dicts for a checkpoint record."""
    key = signing_key.private_key
    data = canonical_json(payload)
    alg = algorithm(key)
    if alg == "ed25519":
        value = key.sign(data)
    elif alg == "ecdsa-sha256":
        value = key.sign(data, ec.ECDSA(hashes.SHA256()))
    else:
        value = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    public = key.public_key()
    signer: dict[str, Any] = {
        "source": signing_key.source,
        "key_id": key_id(public),
        "public_key": base64.b64encode(public_der(public)).decode(),
    }
    if signing_key.certificates:
        signer["certificates"] = [
            c.public_bytes(serialization.Encoding.PEM).decode() for c in signing_key.certificates
        ]
    signature = {"alg": alg, "key_id": signer["key_id"], "value": base64.b64encode(value).decode()}
    return signature, signer


def verify_signature(public_key: Any, alg: str, payload: dict, signature_b64: str) -> bool:
    try:
        value = base64.b64decode(signature_b64, validate=True)
        data = canonical_json(payload)
        if algorithm(public_key) != alg:
            return False
        if alg == "ed25519":
            public_key.verify(value, data)
        elif alg == "ecdsa-sha256":
            public_key.verify(value, data, ec.ECDSA(hashes.SHA256()))
        else:
            public_key.verify(value, data, padding.PKCS1v15(), hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError, SigningError):
        return False


def load_private_key(path: str | Path, source: str = "file") -> SigningKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    algorithm(key)
    return SigningKey(key, source)


def dev_public_key_path(path: str | Path) -> Path:
    """The public half of a generated dev key: `x-dev-key.pem` → `x-dev-key.pub.pem`."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".pem") + ".pub.pem")


def dev_signing_key(path: str | Path) -> SigningKey:
    """The generated development key at `path` (records.dev_key_path), created on first use.

    Concurrent first uses agree on one key: it is linked into place only if none is there yet.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public = dev_public_key_path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False  # another process made it first: use theirs
        finally:
            os.unlink(tmp)
        if created:
            public.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            log.warning(
                "evidence: no signing key configured; generated a development checkpoint key at %s "
                "(public half %s). Configure evidence.signing_key or run with SVIDs in production.",
                path,
                public,
            )
    return load_private_key(path, source="dev")


@dataclass(frozen=True)
class NamedKey:
    """A signer key the operator trusts; `spiffe_id` when it came from an SVID certificate."""

    key: Any
    spiffe_id: str = ""


def spiffe_id_of(cert: x509.Certificate) -> str:
    """The SPIFFE ID of an X.509-SVID (its one spiffe:// URI SAN), or "" when it is not one."""
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        return ""
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    return spiffe[0] if len(uris) == 1 and len(spiffe) == 1 else ""


def spiffe_id_matches(spiffe_id: str, patterns: Iterable[str]) -> bool:
    """Exact match, or `*` in a pattern matching any run of characters (spiffe://example.org/sidecar/*)."""
    for pattern in patterns:
        if "*" not in pattern:
            if spiffe_id == pattern:
                return True
        elif re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), spiffe_id):
            return True
    return False


def load_public_keys(paths: Iterable[str | Path]) -> list[NamedKey]:
    """Signer keys from PEM files: public keys, private keys (their public half) or certificates
    (whose SPIFFE ID, when they are SVIDs, then names the signer in reports)."""
    keys: list[NamedKey] = []
    for path in paths:
        data = Path(path).read_bytes()
        found = False
        for loader in (
            lambda d: serialization.load_pem_public_key(d),
            lambda d: serialization.load_pem_private_key(d, password=None).public_key(),
        ):
            try:
                keys.append(NamedKey(loader(data)))
                found = True
                break
            except (ValueError, TypeError):
                continue
        if not found:
            try:
                keys.extend(NamedKey(c.public_key(), spiffe_id_of(c)) for c in x509.load_pem_x509_certificates(data))
                found = True
            except ValueError:
                pass
        if not found:
            raise SigningError(f"{path}: no PEM public key, private key or certificate found")
    return keys


def load_bundle(path: str | Path) -> list[x509.Certificate]:
    """The CA certificates of a PEM trust bundle; OSError when it cannot be read, as load_public_keys."""
    data = Path(path).read_bytes()
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise SigningError(f"{path}: no PEM certificate found (a trust bundle is CA certificates in PEM)") from None


def chain_trusted(chain_pem: list[str], bundle: list[x509.Certificate], at: datetime) -> str | None:
    """None when the leaf chains to a bundle CA and every cert is valid at `at`; else what is wrong."""
    try:
        chain = [x509.load_pem_x509_certificate(p.encode()) for p in chain_pem]
    except ValueError as exc:
        return f"signer certificate does not parse ({exc})"
    if not chain:
        return "checkpoint carries no signer certificate"
    for cert in chain:
        if not (cert.not_valid_before_utc <= at <= cert.not_valid_after_utc):
            return f"certificate {cert.subject.rfc4514_string() or cert.serial_number} was not valid at {at.isoformat()}"
    for child, parent in zip(chain, chain[1:]):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            return "signer certificate chain is broken"
    top = chain[-1]
    for ca in bundle:
        if top == ca:
            return None
        try:
            top.verify_directly_issued_by(ca)
            return None
        except (ValueError, TypeError, InvalidSignature):
            continue
    return "signer certificate does not chain to the trust bundle"
