"""TEST DOUBLE: a throwaway SPIFFE trust domain's PKI for tests.

Not production code. Built with `cryptography` and PyJWT, it stands in for
what a SPIRE server would issue:

- `TestCa`: a self-signed root (what goes in the X.509 bundle), optionally
  an intermediate, and `issue()` for X.509-SVID leaves. Leaves are shaped
  like SPIRE's (one URI SAN, CA=false, digitalSignature) unless a test asks
  for a malformed one (no URI SAN, two URI SANs, expired, ...).
- `TestJwtAuthority`: an ES256 signing key with a `kid`; `mint()` makes
  JWT-SVIDs and `jwks()` the JWT bundle. `forge()` makes the bad tokens the
  identity tests throw at the sidecar (alg none, tampered payload, ...).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass, field

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = dt.timezone.utc
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


def _name(org: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, str(uuid.uuid4().int)),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class TestSvid:
    """An issued X.509-SVID: leaf first, then intermediates (no root)."""

    spiffe_id: str
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]

    @property
    def cert(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    # Workload API wire format: DER certificates concatenated; key PKCS#8 DER.
    def chain_der(self) -> bytes:
        return b"".join(c.public_bytes(DER) for c in self.chain)

    def key_der(self) -> bytes:
        return self.key.private_bytes(DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    # PEM, for grpcio credentials.
    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return _key_pem(self.key)


class TestCa:
    """A test trust domain's X.509 authority (root, and an intermediate if asked)."""

    __test__ = False  # not a pytest test class

    def __init__(self, trust_domain: str = "example.org", *, intermediate: bool = False):
        self.trust_domain = trust_domain
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._ca_cert(_name("SPIFFE"), self.key, self.key, None)
        self.intermediate: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
        if intermediate:
            ikey = ec.generate_private_key(ec.SECP256R1())
            self.intermediate = (self._ca_cert(_name("SPIRE intermediate"), ikey, self.key, self.cert), ikey)

    def _ca_cert(self, name, key, signer_key, signer_cert) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(signer_cert.subject if signer_cert else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}")]),
                critical=False,
            )
        )
        if signer_cert is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False
            )
        return builder.sign(signer_key, hashes.SHA256())

    # -- bundle ---------------------------------------------------------
    def bundle_der(self) -> bytes:
        return self.cert.public_bytes(DER)

    def bundle_pem(self) -> bytes:
        return self.cert.public_bytes(PEM)

    # -- leaves ---------------------------------------------------------
    def issue(
        self,
        path: str = "/agent",
        *,
        spiffe_id: str | None = None,
        uris: list[str] | None = None,
        dns_names: tuple[str, ...] = (),
        ttl: float = 3600.0,
        not_before: dt.datetime | None = None,
        ca: bool | None = False,
        key_cert_sign: bool = False,
        crl_sign: bool = False,
    ) -> TestSvid:
        """An X.509-SVID. `uris` overrides the URI SANs (none, two, ...) for bad-input tests; `ca` (None: no
        basic constraints), `key_cert_sign` and `crl_sign` make it an authority, which no SVID leaf may be."""
        sid = spiffe_id or f"spiffe://{self.trust_domain}{path}"
        san_uris = [sid] if uris is None else uris
        key = ec.generate_private_key(ec.SECP256R1())
        if self.intermediate:
            signer_cert, signer_key = self.intermediate
        else:
            signer_cert, signer_key = self.cert, self.key
        start = not_before or (_now() - dt.timedelta(minutes=1))
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in san_uris]
        sans += [x509.DNSName(d) for d in dns_names]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("SPIRE"))
            .issuer_name(signer_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(_now() + dt.timedelta(seconds=ttl))
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=True, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if ca is not None:
            builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        cert = builder.sign(signer_key, hashes.SHA256())
        chain = [cert] + ([self.intermediate[0]] if self.intermediate else [])
        return TestSvid(sid, key, chain)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TestJwtAuthority:
    """A test trust domain's JWT signing key (ES256) and its JWKS."""

    __test__ = False

    trust_domain: str = "example.org"
    kid: str = field(default_factory=lambda: uuid.uuid4().hex)
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def mint(
        self,
        spiffe_id: str,
        audience: str | list[str],
        *,
        ttl: float = 300.0,
        extra_claims: dict | None = None,
        headers: dict | None = None,
    ) -> str:
        now = int(time.time())
        claims = {"sub": spiffe_id, "aud": audience, "exp": int(now + ttl), "iat": now}
        claims.update(extra_claims or {})
        claims = {k: v for k, v in claims.items() if v is not None}  # None: leave the claim out
        hdr = {"kid": self.kid, "typ": "JWT"}
        hdr.update(headers or {})
        if hdr.get("kid") is None:
            # PyJWT insists on a string kid; build the header by hand to leave it out.
            hdr.pop("kid", None)
            hdr["alg"] = "ES256"
            signing_input = f"{_b64(json.dumps(hdr).encode())}.{_b64(json.dumps(claims).encode())}"
            signature = jwt.algorithms.ECAlgorithm(jwt.algorithms.ECAlgorithm.SHA256).sign(
                signing_input.encode(), self.key
            )
            return f"{signing_input}.{_b64(signature)}"
        return jwt.encode(claims, self.key, algorithm="ES256", headers=hdr)

    def jwks(self) -> bytes:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk["kid"] = self.kid
        jwk["use"] = "jwt-svid"  # SPIRE marks JWT-bundle keys this way
        return json.dumps({"keys": [jwk]}).encode()


def unsigned_token(claims: dict, header: dict | None = None) -> str:
    """A JWT with `alg: none` and an empty signature: what an attacker sends."""
    hdr = {"alg": "none", "typ": "JWT"}
    hdr.update(header or {})
    return f"{_b64(json.dumps(hdr).encode())}.{_b64(json.dumps(claims).encode())}."


def tamper_payload(token: str, **changes) -> str:
    """Swap claims in a signed token, keeping the original header and signature."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
