"""Credentials the agent never holds: attached by the sidecar to upstream calls.

    provider = credential_provider(kind, ...)          # from config, in server.py
    header, value, use = await provider.header()       # raises CredentialError
    use.kind / use.id                                  # recorded; the value never is

Two kinds (docs/mcp.md#credentials):
- jwt_svid: a JWT-SVID for the upstream's audience from the SPIFFE Workload
  API, cached until `refresh_before_seconds` before it expires (or, for a
  short-lived token, until 40 % of the time it had left when fetched remains);
  a fetch the Workload API does not answer within `fetch_timeout_seconds`
  fails closed (CredentialError naming invoke.jwt_fetch_timeout_seconds);
- secret_file: a secret read from a file (a mounted Kubernetes Secret),
  re-read on each call so a rotated Secret takes effect without a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from sidecar.invoke import CredentialUse
from sidecar.reasons import CREDENTIAL_UNAVAILABLE, Reason


class CredentialError(Exception):
    """The credential could not be had; `reason` is "credential_unavailable: ..." (no call is made)."""

    def __init__(self, text: str):
        self.reason = str(Reason(CREDENTIAL_UNAVAILABLE, text))
        super().__init__(self.reason)


class CredentialProvider(Protocol):
    async def header(self) -> tuple[str, str, CredentialUse]:
        """(header name, header value, what to record). Raises CredentialError."""
        ...


@dataclass(frozen=True)
class SecretFileCredential:
    """`header: scheme secret`, the secret being the file's contents without surrounding whitespace."""

    path: str
    header_name: str = "authorization"
    scheme: str = "Bearer"

    async def header(self) -> tuple[str, str, CredentialUse]:
        try:
            secret = (await asyncio.to_thread(Path(self.path).read_bytes)).strip()
        except OSError as exc:
            raise CredentialError(f"the secret file {self.path} cannot be read ({exc.strerror})") from None
        if not secret:
            raise CredentialError(f"the secret file {self.path} is empty")
        try:
            text = secret.decode("ascii")
        except UnicodeDecodeError:
            raise CredentialError(f"the secret file {self.path} is not ASCII") from None
        if not text.isprintable() or "\n" in text:
            raise CredentialError(f"the secret file {self.path} holds control characters or several lines")
        fingerprint = hashlib.sha256(secret).hexdigest()[:12]
        value = f"{self.scheme} {text}" if self.scheme else text
        return self.header_name, value, CredentialUse("secret_file", f"{self.path}#sha256:{fingerprint}")


# SPIRE's agent keeps handing out its cached JWT-SVID until 45-55 % of the token's
# lifetime is left (a jittered half-life, spire pkg/common/rotationutil shouldRotateJWT).
# Renewing once no more than 40 % of what was left at fetch time remains means the
# agent has a new token to give; a larger margin would ask on every call and get the
# same token back.
RENEW_FRACTION = 0.4

# The config key behind `fetch_timeout_seconds` (docs/configuration.md), named in the reason
# a call is refused with when the Workload API does not answer in time.
FETCH_TIMEOUT_SETTING = "invoke.jwt_fetch_timeout_seconds"


class JwtSvidCredential:
    """`authorization: Bearer <JWT-SVID for audience>`, fetched from the Workload API and cached.

    `fetch(audience) -> (token, spiffe_id, expiry unix seconds)` defaults to
    py-spiffe's WorkloadApiClient on `socket` (unix:///path; "" =
    $SPIFFE_ENDPOINT_SOCKET). A token fetched at time `t` is reused until
    `min(refresh_before_seconds, RENEW_FRACTION * (expiry - t))` seconds
    before its expiry: the margin as configured for SPIRE's default 5-minute
    JWT-SVIDs, a share of the lifetime for tokens shorter than 2.5 margins.

    `fetch_timeout_seconds` (seconds, finite and > 0; the config key
    invoke.jwt_fetch_timeout_seconds) is the gRPC deadline of one
    FetchJWTSVID. When the agent does not answer by then (or an injected
    `fetch` raises TimeoutError), `header()` raises CredentialError whose
    reason names the timeout and the key, and the call is not made; the next
    call asks again. Callers of one audience that need a token at the same
    time share one fetch and its outcome: behind a hung agent each waits at
    most one timeout, not one per caller queued before it.
    """

    def __init__(
        self,
        audience: str,
        *,
        socket: str = "",
        refresh_before_seconds: float = 30.0,
        fetch_timeout_seconds: float = 5.0,
        fetch: Callable[[str], tuple[str, str, int]] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if not math.isfinite(fetch_timeout_seconds) or fetch_timeout_seconds <= 0:
            raise ValueError(f"fetch_timeout_seconds must be a finite number > 0, not {fetch_timeout_seconds!r}")
        self.audience = audience
        self._socket = socket
        self._refresh_before = refresh_before_seconds
        self.fetch_timeout_seconds = fetch_timeout_seconds
        self._fetch = fetch or self._fetch_from_workload_api
        self._clock = clock
        self._cached: tuple[str, str, int] | None = None
        self._renew_at = 0.0  # unix seconds: from then on the cached token is replaced
        self._fetching: asyncio.Future[tuple[str, str, int]] | None = None  # the one fetch in flight

    def _fetch_from_workload_api(self, audience: str) -> tuple[str, str, int]:
        import grpc
        from spiffe import WorkloadApiClient

        with WorkloadApiClient(self._socket or None) as client:
            try:
                svid = client.fetch_jwt_svid(audience={audience}, timeout=self.fetch_timeout_seconds)
            except Exception as exc:  # py-spiffe wraps the gRPC error (FetchJwtSvidError from RpcError)
                if _grpc_code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError("DEADLINE_EXCEEDED") from exc
                raise
        return svid.token, str(svid.spiffe_id), int(svid.expiry)

    async def header(self) -> tuple[str, str, CredentialUse]:
        cached = self._cached
        if cached is None or self._renew_at <= self._clock():
            if self._fetching is None:
                self._fetching = asyncio.ensure_future(self._renew())
                self._fetching.add_done_callback(self._fetched)
            cached = await asyncio.shield(self._fetching)  # a caller that gives up leaves the fetch to the others
        token, spiffe_id, _ = cached
        return "authorization", f"Bearer {token}", CredentialUse("jwt_svid", f"{spiffe_id} aud={self.audience}")

    def _fetched(self, fetch: asyncio.Future) -> None:
        """The fetch is over: the next caller that needs a token starts another. Its outcome was read
        by its waiters, or by nobody when all gave up (then it is read here, not logged as lost)."""
        self._fetching = None
        if not fetch.cancelled():
            fetch.exception()

    async def _renew(self) -> tuple[str, str, int]:
        """Fetch a token and cache it; raises CredentialError (the call is not made)."""
        try:
            fetched = await asyncio.to_thread(self._fetch, self.audience)
        except TimeoutError as exc:  # the agent hangs (SIGSTOP, wedged): no call, the next one asks again
            raise CredentialError(
                f"no JWT-SVID for audience {self.audience!r} from the Workload API: no answer within "
                f"{self.fetch_timeout_seconds:g} s ({FETCH_TIMEOUT_SETTING}; {exc or type(exc).__name__})"
            ) from None
        except Exception as exc:  # py-spiffe raises several kinds; the message never holds a token
            raise CredentialError(
                f"no JWT-SVID for audience {self.audience!r} from the Workload API ({type(exc).__name__}: {exc})"
            ) from None
        fetched_at, expiry = self._clock(), fetched[2]
        if expiry <= fetched_at:
            raise CredentialError(f"the Workload API gave an expired JWT-SVID for audience {self.audience!r}")
        self._cached = fetched
        self._renew_at = expiry - min(self._refresh_before, RENEW_FRACTION * (expiry - fetched_at))
        return fetched


def _grpc_code(exc: BaseException):
    """The status code of the grpc.RpcError that `exc` was raised from, or None."""
    import grpc

    seen: BaseException | None = exc
    for _ in range(8):  # a short chain: py-spiffe wraps once
        if seen is None:
            return None
        if isinstance(seen, grpc.RpcError) and isinstance(seen, grpc.Call):
            return seen.code()
        seen = seen.__cause__ or seen.__context__
    return None
