"""`jwt_svid`: a JWT-SVID in `authorization: Bearer <token>` metadata.

The token is validated here, against the JWT bundles the Workload API
streams to the sidecar (no round trip per call):

- at most 8 KiB; three base64url parts; header `alg` one of the asymmetric
  algorithms the JWT-SVID spec allows (`none` and HMAC are refused), `typ`
  JWT or JOSE when present, a `kid`;
- `sub` a strictly valid SPIFFE ID naming a workload, in an accepted trust
  domain (default: the sidecar's own); the bundle of *that* trust domain is
  the one whose key (`kid`) must have signed the token, and the key type
  must fit `alg`;
- `aud` is exactly one value, the expected audience (a list with the right
  audience and others is refused: any other audience's holder could replay
  the token here, JWT-SVID spec section 6.2); `exp` present and in the
  future (`nbf` honoured when present).

A caller's token is validated for `identity.jwt_audience`; delegation links
for the audience that binds them into their chain (delegation.py), so a
credential minted for one purpose is never accepted for the other.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.identity import CallerIdentity, IdentityError, PeerInfo, Subject
from sidecar.identity.spiffe_id import SpiffeIdError, validate_workload_id
from sidecar.identity.workload_api import SvidUnavailable, WorkloadApiSource
from sidecar.identity.x509 import rfc3339, shorten, utcnow

log = logging.getLogger("sidecar.identity.jwt_svid")

MAX_TOKEN_BYTES = 8 * 1024
AUTHORIZATION = "authorization"
_EC_ALGS = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_RSA_ALGS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
ALLOWED_ALGS = frozenset(_EC_ALGS) | frozenset(_RSA_ALGS)


class JwtSvidInvalid(Exception):
    """The token is not an acceptable JWT-SVID; the message says why."""


class AudienceMismatch(JwtSvidInvalid):
    """The token is a valid JWT-SVID, but minted for another audience (another purpose or hop)."""


@dataclass(frozen=True)
class VerifiedJwtSvid:
    spiffe_id: str
    trust_domain: str
    expires_at: dt.datetime
    claims: dict

    def subject(self, source: str = "jwt_svid") -> Subject:
        return Subject(self.spiffe_id, source=source, svid_expires_at=rfc3339(self.expires_at))


def _b64json(part: str, what: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        return json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise JwtSvidInvalid(f"the token's {what} is not base64url JSON") from None


def token_audiences(claims: dict) -> list[str]:
    """The `aud` claim as a list (RFC 7519 allows one string or an array of strings)."""
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return list(aud)
    raise JwtSvidInvalid("the token's aud claim is not a string or a list of strings")


def unverified_sub(token: str) -> str:
    """The `sub` of a token before its signature is checked (to work out which audience it needs).

    Raises JwtSvidInvalid when there is no readable sub; the caller must still
    validate the token, which verifies this sub with the signature.
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        raise JwtSvidInvalid("the token is not a signed JWT (header.payload.signature)")
    claims = _b64json(parts[1], "payload")
    sub = claims.get("sub") if isinstance(claims, dict) else None
    if not isinstance(sub, str) or not sub:
        raise JwtSvidInvalid("the token has no sub claim")
    return sub


class JwtSvidValidator:
    """Validates JWT-SVIDs against the Workload API's JWT bundles.

    `audience` is the one audience tokens must carry unless `validate` is
    given another (delegation links: each has its own, see delegation.py).
    """

    def __init__(
        self,
        source: WorkloadApiSource,
        audience: str,
        trust_domains: Iterable[str] = (),
        clock: Callable[[], dt.datetime] = utcnow,
        max_bytes: int = MAX_TOKEN_BYTES,
    ):
        if not audience:
            raise ValueError("a JWT-SVID audience is required")
        self._source = source
        self.audience = audience
        self._trust_domains = tuple(trust_domains)
        self._clock = clock
        self._max_bytes = max_bytes

    def accepted_trust_domains(self) -> tuple[str, ...]:
        if self._trust_domains:
            return self._trust_domains
        own = self._source.trust_domain()
        return (own,) if own else ()

    def validate(self, token: str, audience: str | None = None) -> VerifiedJwtSvid:
        """The verified token, whose `aud` must be exactly [`audience`] (default: the validator's).

        Raises JwtSvidInvalid (AudienceMismatch for a token minted for another audience).
        """
        expected = audience if audience is not None else self.audience
        if not expected:
            raise ValueError("a JWT-SVID audience is required")
        size = len(token.encode("utf-8", "surrogatepass"))
        if size > self._max_bytes:
            raise JwtSvidInvalid(f"the token is {size} bytes, over the {self._max_bytes}-byte limit")
        parts = token.split(".")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise JwtSvidInvalid("the token is not a signed JWT (header.payload.signature)")
        header = _b64json(parts[0], "header")
        if not isinstance(header, dict):
            raise JwtSvidInvalid("the token's header is not a JSON object")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise JwtSvidInvalid("alg 'none' (an unsigned token) is refused")
        if alg not in ALLOWED_ALGS:
            raise JwtSvidInvalid(f"alg {shorten(alg)} is not allowed for JWT-SVIDs")
        typ = header.get("typ")
        if typ is not None and typ not in ("JWT", "JOSE"):
            raise JwtSvidInvalid(f"typ {shorten(str(typ))} is not JWT or JOSE")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise JwtSvidInvalid("the token has no kid")
        if not parts[2]:
            raise JwtSvidInvalid("the token has no signature")
        claims = _b64json(parts[1], "payload")
        if not isinstance(claims, dict):
            raise JwtSvidInvalid("the token's payload is not a JSON object")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise JwtSvidInvalid("the token has no sub claim")
        try:
            id_parts = validate_workload_id(sub)
        except SpiffeIdError as exc:
            raise JwtSvidInvalid(f"sub {shorten(sub)} is not a valid SPIFFE ID: {exc}") from None
        td = id_parts.trust_domain
        accepted = self.accepted_trust_domains()
        if td not in accepted:
            raise JwtSvidInvalid(
                f"trust domain {td} is not accepted (accepted: {', '.join(accepted) or 'none yet'})"
            )
        try:
            keys = self._source.jwt_keys(td)
        except SvidUnavailable as exc:
            raise JwtSvidInvalid(exc.reason) from None
        if keys is None:
            raise JwtSvidInvalid(f"no JWT bundle for trust domain {td}")
        key = keys.get(kid)
        if key is None:
            raise JwtSvidInvalid(f"unknown kid {shorten(kid)} for trust domain {td}")
        if alg in _EC_ALGS:
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != _EC_ALGS[alg]:
                raise JwtSvidInvalid(f"key {shorten(kid)} does not fit alg {alg}")
        elif not isinstance(key, rsa.RSAPublicKey):
            raise JwtSvidInvalid(f"key {shorten(kid)} does not fit alg {alg}")
        now = self._clock()
        try:
            verified = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=expected,
                options={"require": ["sub", "aud", "exp"], "verify_iat": False},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            exp = claims.get("exp")
            when = rfc3339(dt.datetime.fromtimestamp(exp, dt.timezone.utc)) if isinstance(exp, (int, float)) else "?"
            raise JwtSvidInvalid(f"the token expired at {when}") from None
        except jwt.InvalidAudienceError:
            raise AudienceMismatch(f"the token's audience does not include {shorten(expected, 300)}") from None
        except jwt.InvalidSignatureError:
            raise JwtSvidInvalid(f"the signature does not verify with key {shorten(kid)} of {td}") from None
        except jwt.ImmatureSignatureError:
            raise JwtSvidInvalid("the token is not valid yet (nbf)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise JwtSvidInvalid(f"the token has no {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            raise JwtSvidInvalid(f"the token is malformed: {exc}") from None
        if verified.get("sub") != sub:  # same bytes, so cannot differ; kept as a guard
            raise JwtSvidInvalid("the verified sub differs from the parsed one")
        audiences = token_audiences(verified)
        if audiences != [expected]:
            raise AudienceMismatch(
                f"the token carries {len(audiences)} audiences; a JWT-SVID presented here must carry exactly one, "
                f"{shorten(expected, 300)} (a token with several can be replayed by each audience's holder)"
            )
        exp = verified["exp"]
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise JwtSvidInvalid("the token's exp is not a number")
        try:
            expires_at = dt.datetime.fromtimestamp(exp, dt.timezone.utc)
        except (OverflowError, ValueError, OSError):  # past 9999-12-31: no time anyone can read back
            raise JwtSvidInvalid(f"the token's exp {exp!r} is not a time before 10000-01-01") from None
        # PyJWT compares exp with its own clock; also honour the injectable one.
        if now >= expires_at:
            raise JwtSvidInvalid(f"the token expired at {rfc3339(expires_at)}")
        return VerifiedJwtSvid(f"spiffe://{td}{id_parts.path}", td, expires_at, verified)


def bearer_token(metadata) -> str | None:
    """The token of `authorization: Bearer <token>`, None when the header is absent."""
    value = metadata.get(AUTHORIZATION)
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise IdentityError("jwt_svid: the authorization metadata is not 'Bearer <JWT-SVID>'")
    if any(c.isspace() or c == "," for c in token):
        raise IdentityError("jwt_svid: the authorization metadata holds more than one token")
    return token


class JwtSvidResolver:
    """`jwt_svid`: the subject is the `sub` of a valid JWT-SVID in the authorization metadata."""

    source_name = "jwt_svid"

    def __init__(self, validator: JwtSvidValidator, source: WorkloadApiSource):
        self._validator = validator
        self._source = source

    def applies(self, peer: PeerInfo) -> bool:
        return AUTHORIZATION in peer.metadata

    def health(self) -> tuple[bool, str]:
        return self._source.health()

    def resolve(self, peer: PeerInfo) -> CallerIdentity:
        token = bearer_token(peer.metadata)
        if token is None:
            raise IdentityError("jwt_svid: the call carries no 'authorization: Bearer <JWT-SVID>' metadata")
        try:
            self._source.x509()  # the sidecar's own SVID must be current too
        except SvidUnavailable as exc:
            raise IdentityError(f"jwt_svid: {exc.reason}") from None
        try:
            verified = self._validator.validate(token)
        except JwtSvidInvalid as exc:
            raise IdentityError(f"jwt_svid: {exc}") from None
        return CallerIdentity(verified.subject())
