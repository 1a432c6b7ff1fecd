"""Mutual TLS for the MCP gateway's TCP listener, with the sidecar's X.509-SVID (the HTTPS twin of
`sidecar.identity.mtls.SvidServerCredentials`).

    contexts = SvidSslContexts(source, trust_domains)       # a started WorkloadApiSource
    uvicorn.Config(app, http=TlsH11Protocol, ssl_context_factory=lambda *_: contexts.listening_context())
    peer = PeerInfo("tls", headers, auth_context=peer_auth_context(scope))   # per request

- `SvidSslContexts`: the listening `ssl.SSLContext` holds no certificate of its own. Its SNI
  callback, which OpenSSL runs on every ClientHello (with or without a server name), moves the
  new connection to an SSLContext built from the SVID and bundles held *now*: the SVID as the
  server certificate, a client certificate required and verified against the X.509 bundles of
  the accepted trust domains (`identity.trust_domains`; empty = the sidecar's own). A rotated
  SVID or bundle is therefore used by new connections at once; open connections keep theirs.
  Before the first SVID every handshake fails (no certificate to present, no client CA).
  When the source has no usable SVID later (withdrawn, expired), the last context stays, as
  grpc's credentials do; the `mtls` resolver then denies each call with the source's reason.
- `TlsH11Protocol`: uvicorn's h11 protocol, which puts the TLS layer's verified client chain
  into every request's ASGI scope as the ASGI TLS extension (`scope["extensions"]["tls"]
  ["client_cert_chain"]`: PEM strings, leaf first, ending at the trust anchor).
- `peer_auth_context(scope)`: that chain as `PeerInfo.auth_context`, in the keys grpc uses and
  the `mtls` resolver reads (`x509_pem_cert`, `x509_pem_cert_chain`, `peer_spiffe_id`), so one
  resolver applies the same checks to both front doors.
- `client_ssl_context(x509_source)`: the agent side, for an MCP SDK client over HTTPS.

Handshake refusals (no client certificate, a CA outside the accepted bundles, an expired
certificate) never reach the app, so there is no request to record: `_LoggedHandshake` logs each
with OpenSSL's reason (asyncio itself reports them only in debug mode).

Why uvicorn internals and, below Python 3.13, a private `ssl` method (checked 2026-11-29 against
uvicorn 0.54.0, the newest release, pinned `uvicorn>=0.47`; Python 3.11.7, 3.12.1, 3.13.0):

- No public route from the TLS layer to the ASGI scope. uvicorn 0.54.0 does not implement the ASGI
  TLS extension (Kludex/uvicorn PRs #1119, #2586, #3132, #3133 are open, #3043 was closed
  unmerged) and puts no transport in the scope (issues #400, #745, #2306 closed without it), so
  neither the app nor an ASGI middleware can see the connection. Only the protocol object holds
  it: `TlsH11Protocol` is chosen through uvicorn's public `Config(http=...)`, but wraps the
  `app` attribute H11Protocol sets in `__init__`, and its `shutdown` reads `cycle` and
  `transport` (tests/test_mcp_mtls.py fails if a uvicorn release changes them).
- No public route to the verified chain on 3.11/3.12. `SSLObject.get_verified_chain()` is public
  from 3.13 (gh-109109; DER bytes, gh-118658); 3.11/3.12 have it only on the private `_sslobj`
  (bpo-18233; `_ssl.Certificate` objects). The public `getpeercert(binary_form=True)` gives the
  leaf alone, and no public 3.11 call gives the intermediates the client sent, so the chain
  cannot be rebuilt and checked against the SPIFFE bundles as `identity/mtls.py` does for grpc:
  a client chain through an intermediate CA would be refused, and which trust domain's bundle
  the chain ends in (a partner CA must not vouch for our trust domain) could not be checked
  (tests/test_mcp_mtls.py, `..._intermediate_ca_...` and `partner-ca-for-our-domain`). uvicorn's
  open TLS PRs give below 3.13 only the leaf, or nothing.
- Revisit: with `requires-python >= 3.13`, drop the private branch of `_verified_chain_pem`; with
  a uvicorn release that fills `scope["extensions"]["tls"]["client_cert_chain"]` with the
  verified chain, drop `connection_made` and `_WithTls` here.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import sys
import threading
from typing import Any, Iterable

from cryptography.hazmat.primitives import serialization
from uvicorn.protocols.http.h11_impl import H11Protocol

from sidecar.identity.mtls import bundle_pem, svid_pem
from sidecar.identity.workload_api import HeldSvid, SvidUnavailable, WorkloadApiSource
from sidecar.identity.x509 import SvidError, certs_pem, load_pem_chain, uri_sans

log = logging.getLogger(__name__)

# ASGI TLS extension's tls_version values (asgi.readthedocs.io, "TLS"): the TLS record version.
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def _load_cert_chain(context: ssl.SSLContext, key_pem: bytes, chain_pem: bytes) -> None:
    """`SSLContext.load_cert_chain` reads only files: hand it an anonymous in-memory file
    (memfd, never on a filesystem), closed as soon as OpenSSL has read it."""
    fd = os.memfd_create("agent-sidecar-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, key_pem + chain_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _server_context() -> ssl.SSLContext:
    """TLS 1.2+, a client certificate required, no renegotiation: the caller's certificate is read
    once per connection (TlsH11Protocol), so a TLS 1.2 client must not swap it mid-connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


class _LoggedHandshake(ssl.SSLObject):
    """The listening context's SSLObject (`SSLContext.sslobject_class`): logs a refused handshake."""

    no_context = ""  # set by the SNI callback when there was no SVID to serve: why

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # the handshake goes on when more bytes arrive
        except ssl.SSLError as exc:
            why = f" (the gateway has no certificate to present: {self.no_context})" if self.no_context else ""
            log.warning("MCP gateway: TLS handshake refused: %s%s", exc, why)
            raise


class SvidSslContexts:
    """The gateway's server-side TLS, following the held SVID and bundles (module docstring)."""

    def __init__(self, source: WorkloadApiSource, trust_domains: Iterable[str] = ()):
        self._source = source
        self._trust_domains = tuple(trust_domains)  # empty: the sidecar's own
        self._lock = threading.Lock()
        self._served: tuple[int, ssl.SSLContext] | None = None  # (HeldSvid.version, its context)

    def listening_context(self) -> ssl.SSLContext:
        """The SSLContext to listen with: no certificate itself, each handshake moved to the current one."""
        context = _server_context()  # and no certificate or CA loaded: nobody verifies here
        context.sni_callback = self._select
        context.sslobject_class = _LoggedHandshake
        try:
            self.current()  # the SVID held at start is served even if it is withdrawn before the first handshake
        except SvidUnavailable:
            pass  # not yet: handshakes fail (and are logged) until it arrives
        return context

    def _select(self, connection: ssl.SSLObject, _server_name: str | None, _listening: ssl.SSLContext) -> None:
        # An exception here would fail the handshake with no word why: report it instead.
        try:
            connection.context = self.current()
        except SvidUnavailable as exc:
            if isinstance(connection, _LoggedHandshake):
                connection.no_context = exc.reason
        except Exception:
            log.exception("MCP gateway: could not choose the TLS context of a new connection")

    def current(self) -> ssl.SSLContext:
        """The context for a new connection, rebuilt when the source's SVID or bundles change.

        Raises SvidUnavailable while no SVID was ever held; once one was, a source without a usable
        SVID (withdrawn, expired) keeps the last context, as grpc's credentials do.
        """
        try:
            held = self._source.x509()
        except SvidUnavailable:
            with self._lock:
                if self._served is None:
                    raise
                return self._served[1]
        with self._lock:
            if self._served is not None and self._served[0] == held.version:
                return self._served[1]
        try:
            context = self._context(held)
        except Exception as exc:
            log.exception("MCP gateway: could not build the TLS context from SVID serial %x", held.serial)
            with self._lock:
                if self._served is None:
                    raise SvidUnavailable(f"the TLS context could not be built ({type(exc).__name__})") from None
                return self._served[1]
        with self._lock:
            if self._served is None or self._served[0] < held.version:
                if self._served is not None:
                    log.info("MCP gateway: TLS now serves SVID serial %x for new connections", held.serial)
                self._served = (held.version, context)
            return self._served[1]

    def _context(self, held: HeldSvid) -> ssl.SSLContext:
        accepted = self._trust_domains or (held.trust_domain,)
        missing = [td for td in accepted if td not in held.bundles]
        if missing:
            log.warning("MCP gateway: no X.509 bundle for accepted trust domain(s) %s; their clients cannot connect",
                        ", ".join(missing))
        context = _server_context()
        _load_cert_chain(context, *svid_pem(held))
        roots = bundle_pem(held, accepted)
        if roots:
            context.load_verify_locations(cadata=roots.decode("ascii"))
        return context


def _verified_chain_pem(ssl_object: ssl.SSLObject) -> list[str]:
    """The chain OpenSSL verified for the peer, as PEM strings (leaf first, ending at the trust anchor);
    [] without a peer certificate. Public from Python 3.13; private before (module docstring)."""
    if sys.version_info >= (3, 13):
        return [ssl.DER_cert_to_PEM_cert(der) for der in ssl_object.get_verified_chain()]
    return [cert.public_bytes() for cert in ssl_object._sslobj.get_verified_chain() or ()]  # PEM str by default


def tls_extension(ssl_object: ssl.SSLObject | None) -> dict[str, Any] | None:
    """The ASGI TLS extension of a connection (None when it is not TLS).

    `client_cert_chain` is the chain OpenSSL verified (leaf first, ending at the trust
    anchor), not merely what the client sent.
    """
    if ssl_object is None:
        return None
    return {
        "server_cert": None,
        "client_cert_chain": _verified_chain_pem(ssl_object),
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


class _WithTls:
    """ASGI wrapper: adds one connection's TLS extension to the scope of each of its requests."""

    def __init__(self, app: Any, tls: dict[str, Any]):
        self._app = app
        self._tls = tls

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            scope.setdefault("extensions", {})["tls"] = self._tls
        await self._app(scope, receive, send)


class TlsH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, adding the ASGI TLS extension (the verified client chain) to the scope.

    asyncio calls `connection_made` once the handshake is complete, so the chain is read once per
    connection. (uvicorn hands each request to `self.app`; pinned in pyproject.toml.)
    """

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        tls = tls_extension(transport.get_extra_info("ssl_object"))
        if tls is not None:
            self.app = _WithTls(self.app, tls)

    def shutdown(self) -> None:
        """Server shutdown: an idle connection is dropped at once. Closing TLS waits for the client's
        close_notify (up to asyncio's 30 s ssl_shutdown_timeout), which an idle pooled client never
        sends, so the gateway's stop would hang; a connection with a response in flight finishes it."""
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()
        if idle:
            self.transport.abort()


def peer_auth_context(scope: dict) -> dict[str, tuple[bytes, ...]]:
    """`PeerInfo.auth_context` from the scope's TLS extension, in grpc's keys; {} without a client chain.

    `peer_spiffe_id` is set as grpc sets it: when the leaf has exactly one URI SAN and it is
    spiffe://. The `mtls` resolver then validates the ID strictly, the trust domain and
    which bundle the chain ends in, and the expiry (sidecar/identity/mtls.py).
    """
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = [pem.encode("ascii") for pem in tls.get("client_cert_chain") or ()]
    if not chain:
        return {}
    context: dict[str, tuple[bytes, ...]] = {"x509_pem_cert": (chain[0],), "x509_pem_cert_chain": (b"".join(chain[1:]),)}
    spiffe_id = _peer_spiffe_id(chain[0])
    if spiffe_id is not None:
        context["peer_spiffe_id"] = (spiffe_id,)
    return context


@functools.lru_cache(maxsize=512)  # per request, mostly the same few callers' certificates
def _peer_spiffe_id(leaf_pem: bytes) -> bytes | None:
    try:
        uris = uri_sans(load_pem_chain(leaf_pem)[0])
    except (SvidError, IndexError):
        return None
    return uris[0].encode("utf-8") if len(uris) == 1 and uris[0].startswith("spiffe://") else None


def client_ssl_context(source) -> ssl.SSLContext:
    """Agent side: an `ssl.SSLContext` presenting the current SVID of a py-spiffe `X509Source` and
    trusting its X.509 bundles, for `httpx2.AsyncClient(verify=...)` in front of the MCP SDK client.

    A snapshot, like `sidecar.identity.mtls.x509_source_channel_credentials`: build a new context
    (and HTTP client) after the source rotates. Python's ssl checks the server's *hostname*, not its
    SPIFFE ID: reach the gateway by a DNS name in the sidecar's SVID (docs/identity.md, `mtls`).
    Linux only (the key is loaded from an in-memory file, never written to disk).
    """
    context = source.get_x509_context()
    svid = context.default_svid
    roots = certs_pem(a for b in context.x509_bundle_set.bundles for a in b.x509_authorities)
    tls = ssl.create_default_context(cadata=roots.decode("ascii"))
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _load_cert_chain(tls, key, certs_pem(svid.cert_chain))
    return tls


__all__ = ["SvidSslContexts", "TlsH11Protocol", "client_ssl_context", "peer_auth_context", "tls_extension"]
