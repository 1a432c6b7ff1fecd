"""CSRF tokens for the console's forms: HMAC-signed, bound to the approver, short-lived.

    token = "<issued unix time>.<hex HMAC-SHA256(secret, approver | issued)>"

A cross-site page cannot read the token (same-origin policy) nor forge one
(it lacks the secret), and a token issued to one approver is worthless to
another. Tokens last `max_age` seconds (a page left open overnight needs a
reload). No cookie or server-side session is needed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path

DEFAULT_MAX_AGE = 12 * 3600


class CsrfError(Exception):
    pass


def load_secret(path: str) -> bytes:
    """The secret in `path`, or a random one (tokens then die with the process)."""
    if not path:
        return secrets.token_bytes(32)
    data = Path(path).read_bytes().strip()
    if len(data) < 16:
        raise CsrfError(f"{path}: the CSRF secret must be at least 16 bytes")
    return data


class CsrfTokens:
    def __init__(self, secret: bytes, *, max_age: float = DEFAULT_MAX_AGE):
        self._secret = secret
        self.max_age = max_age

    def _mac(self, approver: str, issued: int) -> str:
        message = f"{approver}|{issued}".encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def issue(self, approver: str, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        return f"{issued}.{self._mac(approver, issued)}"

    def check(self, token: str | None, approver: str, now: float | None = None) -> None:
        """Raise CsrfError saying why unless `token` was issued to `approver` recently."""
        if not token:
            raise CsrfError("the form carries no CSRF token")
        issued_text, dot, mac = token.partition(".")
        # ASCII digits only: str.isdigit also passes '²' (which int() refuses) and '١٢' (which it reads as 12)
        if not dot or not (issued_text.isascii() and issued_text.isdigit()) or len(mac) != 64:
            raise CsrfError("the CSRF token is malformed")
        issued = int(issued_text)
        if not hmac.compare_digest(mac, self._mac(approver, issued)):
            raise CsrfError("the CSRF token is not valid for you")
        age = (time.time() if now is None else now) - issued
        if age < -60 or age > self.max_age:
            raise CsrfError("the CSRF token has expired: reload the page")
