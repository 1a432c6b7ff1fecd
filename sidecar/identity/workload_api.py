"""The sidecar's own identity and trust bundles, from the SPIFFE Workload API.

`WorkloadApiSource` holds what the SPIRE agent hands the sidecar: its
X.509-SVID (with the X.509 bundles) and the JWT bundles. Both arrive on
py-spiffe's streaming RPCs, so rotation needs no restart.

py-spiffe is synchronous and its streams run on daemon threads. One
supervisor thread per stream (X.509, JWT bundles) opens a
`WorkloadApiClient` stream, waits for its first answer and then for its end;
when it ends, it reopens it with exponential backoff (tenacity), logging why
in one line: the socket does not exist yet, the agent answers "no identity
issued", the agent does not answer at all, the stream broke.

Rules that py-spiffe does not enforce and this module does:
- an SVID past `not_valid_after` (or before `not_valid_before`) is never
  used; `x509()` raises `SvidUnavailable` with the reason until a fresh one
  arrives (py-spiffe keeps serving a stale SVID when the agent goes away);
- PERMISSION_DENIED on a stream means the agent withdrew the identity: the
  held SVID (or JWT bundles) is dropped at once, not kept until expiry;
- the SVID's SPIFFE ID and every trust domain name are validated strictly.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn

import tenacity
from cryptography import x509
from spiffe import WorkloadApiClient
from spiffe.errors import ArgumentError

from sidecar.identity import CallerIdentity, IdentityError, PeerInfo, Subject
from sidecar.identity.spiffe_id import SpiffeIdError, SpiffeIdParts, validate_trust_domain
from sidecar.identity.x509 import SvidError, rfc3339, shorten, svid_spiffe_id, utcnow

log = logging.getLogger("sidecar.identity.workload_api")

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"


class SvidUnavailable(Exception):
    """The sidecar holds no usable SVID or bundle right now; the reason says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class HeldSvid:
    """The sidecar's X.509-SVID and the X.509 bundles that came with it."""

    spiffe_id: str
    parts: SpiffeIdParts
    chain: tuple[x509.Certificate, ...]
    private_key: Any
    bundles: Mapping[str, tuple[x509.Certificate, ...]]  # trust domain -> authorities
    version: int
    # The SPIFFE IDs of the other X.509-SVIDs the Workload API gave with it (every registration that
    # matches the sidecar's process, pod-level ones included, so the agent may hold them too).
    also: tuple[str, ...] = ()

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def trust_domain(self) -> str:
        return self.parts.trust_domain

    @property
    def expires_at(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.leaf.serial_number


@dataclass(frozen=True)
class JwtBundles:
    """JWT bundles by trust domain: kid -> public key."""

    keys: Mapping[str, Mapping[str, Any]]
    version: int


def resolve_endpoint(configured: str = "") -> str:
    """The Workload API address: config first, else SPIFFE_ENDPOINT_SOCKET.

    Only `unix:///absolute/path` is accepted (the agent's socket in the pod);
    a bad or missing value is a configuration error (ConfigError, a
    ValueError naming the setting), found at startup, not retried: the
    sidecar refuses to start rather than serve without an identity.
    """
    from sidecar.config import ConfigError

    endpoint = configured or os.environ.get(ENDPOINT_ENV, "")
    if not endpoint:
        raise ConfigError(
            f"identity.workload_api_socket: empty and {ENDPOINT_ENV} is not set, so there is no SPIFFE "
            "Workload API to take the sidecar's identity from (workload_api, mtls and jwt_svid need it); "
            "set either to the SPIRE agent's socket (unix:///path/to/agent.sock)"
        )
    if not endpoint.startswith("unix://") or not endpoint[len("unix://"):].startswith("/"):
        key = "identity.workload_api_socket" if configured else ENDPOINT_ENV
        raise ConfigError(f"{key}: Workload API socket {endpoint!r} must look like unix:///absolute/path")
    return endpoint


def socket_path(endpoint: str) -> str:
    return "/" + endpoint[len("unix://"):].lstrip("/")


class _StreamDown(Exception):
    """A stream could not be (re)opened; retried with backoff."""


class _Closed(Exception):
    pass


class _Session:
    """One open py-spiffe stream: first answer, then its end."""

    def __init__(self, apply: Callable[[Any], None]):
        self._apply = apply
        self.first = threading.Event()
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self.cancelled = False

    def on_success(self, value: Any) -> None:
        if self.cancelled:
            return
        self._apply(value)  # raising here ends the stream through on_error
        self.first.set()

    def on_error(self, error: BaseException) -> None:
        if not self.cancelled:
            self.error = error
        self.ended.set()


def _describe(error: BaseException | None) -> str:
    text = str(error) if error is not None else "stream ended"
    if "PERMISSION_DENIED" in text:
        return "no identity issued (PERMISSION_DENIED): is this workload registered with SPIRE?"
    if "UNAVAILABLE" in text:
        return "the agent is unavailable (UNAVAILABLE)"
    return text


def _withdrawn(error: BaseException | None) -> bool:
    # py-spiffe reports a stream's gRPC failure as WorkloadApiError("gRPC error: StatusCode.X").
    return error is not None and "PERMISSION_DENIED" in str(error)


@dataclass
class _StreamState:
    name: str
    last_error: str = ""
    attempts: int = 0
    session: _Session | None = None
    handle: Any = None
    client: Any = None
    thread: threading.Thread | None = None


class WorkloadApiSource:
    """The sidecar's SVID and bundles, kept fresh from the Workload API."""

    def __init__(
        self,
        endpoint: str = "",
        *,
        jwt_bundles: bool = True,
        answer_timeout: float = 10.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        clock: Callable[[], dt.datetime] = utcnow,
    ):
        self.endpoint = resolve_endpoint(endpoint)
        self._want_jwt = jwt_bundles
        self._answer_timeout = answer_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = max(backoff_max, backoff_initial)
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._version = 0
        self._svid: HeldSvid | None = None
        self._svid_gone = ""  # why the last SVID was dropped (withdrawn)
        self._jwt: JwtBundles | None = None
        self._jwt_gone = ""
        self._stale_version = -1
        self._streams = {"x509": _StreamState("X.509-SVID")}
        if jwt_bundles:
            self._streams["jwt"] = _StreamState("JWT bundles")
        self._started = False

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "WorkloadApiSource":
        """Start watching in the background; returns at once (see `wait_until_ready`)."""
        if self._started:
            return self
        self._started = True
        log.info("identity: watching the SPIFFE Workload API at %s", self.endpoint)
        for kind, state in self._streams.items():
            state.thread = threading.Thread(
                target=self._supervise, args=(kind,), name=f"workload-api-{kind}", daemon=True
            )
            state.thread.start()
        return self

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        """True once an unexpired SVID (and the JWT bundles, if watched) is held."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed.is_set():
            if self.health()[0]:
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._closed.wait(0.05 if remaining is None else min(0.05, remaining))
        return False

    def close(self) -> None:
        self._closed.set()
        for state in self._streams.values():
            self._teardown(state)
        for state in self._streams.values():
            if state.thread is not None and state.thread is not threading.current_thread():
                state.thread.join(timeout=2)

    # ------------------------------------------------------------ reading
    def x509(self) -> HeldSvid:
        """The SVID to use now, or SvidUnavailable saying why there is none."""
        with self._lock:
            held, gone = self._svid, self._svid_gone
            state = self._streams["x509"]
            last_error = state.last_error
        if held is None:
            if gone:
                raise SvidUnavailable(gone)
            detail = f" (last attempt: {last_error})" if last_error else ""
            raise SvidUnavailable(f"no X.509-SVID from the Workload API at {self.endpoint} yet{detail}")
        now = self._clock()
        if now >= held.leaf.not_valid_after_utc:
            raise SvidUnavailable(
                f"the sidecar's X.509-SVID {held.spiffe_id} expired at {rfc3339(held.expires_at)}; "
                "waiting for a fresh one from the Workload API"
                + (f" (last attempt: {last_error})" if last_error else "")
            )
        if now < held.leaf.not_valid_before_utc:
            raise SvidUnavailable(
                f"the sidecar's X.509-SVID {held.spiffe_id} is not valid before "
                f"{rfc3339(held.leaf.not_valid_before_utc)}"
            )
        return held

    def jwt_keys(self, trust_domain: str) -> Mapping[str, Any] | None:
        """kid -> public key for one trust domain (None: no bundle for it); SvidUnavailable if none held."""
        with self._lock:
            bundles, gone = self._jwt, self._jwt_gone
            last_error = self._streams["jwt"].last_error if "jwt" in self._streams else ""
        if not self._want_jwt:
            raise SvidUnavailable("JWT bundles are not watched (no JWT-SVID source configured)")
        if bundles is None:
            if gone:
                raise SvidUnavailable(gone)
            detail = f" (last attempt: {last_error})" if last_error else ""
            raise SvidUnavailable(f"no JWT bundles from the Workload API at {self.endpoint} yet{detail}")
        return bundles.keys.get(trust_domain)

    def trust_domain(self) -> str | None:
        with self._lock:
            return self._svid.trust_domain if self._svid is not None else None

    def health(self) -> tuple[bool, str]:
        try:
            held = self.x509()
        except SvidUnavailable as exc:
            return False, exc.reason
        if self._want_jwt:
            with self._lock:
                bundles, gone = self._jwt, self._jwt_gone
            if bundles is None:
                return False, gone or f"no JWT bundles from the Workload API at {self.endpoint} yet"
        return True, f"SVID {held.spiffe_id} valid until {rfc3339(held.expires_at)}"

    # ------------------------------------------------------------ updates
    def _apply_x509(self, context: Any) -> None:
        svids = context.x509_svids
        if not svids:
            raise SvidError("the Workload API answered with no X.509-SVID")
        svid = svids[0]  # the default SVID, as SPIRE orders them
        chain = tuple(svid.cert_chain)
        parts = svid_spiffe_id(chain[0])  # strict: py-spiffe lowercases
        bundles: dict[str, tuple[x509.Certificate, ...]] = {}
        for bundle in context.x509_bundle_set.bundles:
            name = bundle.trust_domain.name
            try:
                validate_trust_domain(name)
            except SpiffeIdError as exc:
                log.warning("identity: ignoring X.509 bundle for trust domain %s: %s", shorten(name), exc)
                continue
            bundles[name] = tuple(sorted(bundle.x509_authorities, key=lambda c: c.serial_number))
        if parts.trust_domain not in bundles:
            raise SvidError(f"the Workload API sent no X.509 bundle for the SVID's trust domain {parts.trust_domain}")
        spiffe_id = f"spiffe://{parts.trust_domain}{parts.path}"
        also = []
        for other in svids[1:]:
            try:
                other_parts = svid_spiffe_id(other.cert_chain[0])
            except SvidError:  # not a valid SVID: no resolver takes it from anyone
                continue
            also.append(f"spiffe://{other_parts.trust_domain}{other_parts.path}")
        with self._lock:
            self._version += 1
            held = HeldSvid(spiffe_id, parts, chain, svid.private_key, bundles, self._version, tuple(also))
            previous = self._svid
            self._svid = held
            self._svid_gone = ""
        if previous is None or previous.serial != held.serial:
            log.info(
                "identity: %s SVID %s (serial %x) valid until %s",
                "received" if previous is None else "rotated to",
                spiffe_id, held.serial, rfc3339(held.expires_at),
            )

    def _apply_jwt(self, bundle_set: Any) -> None:
        keys: dict[str, dict[str, Any]] = {}
        for bundle in bundle_set.bundles:
            name = bundle.trust_domain.name
            try:
                validate_trust_domain(name)
            except SpiffeIdError as exc:
                log.warning("identity: ignoring JWT bundle for trust domain %s: %s", shorten(name), exc)
                continue
            keys[name] = dict(bundle.jwt_authorities)
        with self._lock:
            self._version += 1
            first = self._jwt is None
            self._jwt = JwtBundles(keys, self._version)
            self._jwt_gone = ""
        log.info(
            "identity: %s JWT bundles for %s",
            "received" if first else "updated",
            ", ".join(f"{td} ({len(k)} keys)" for td, k in sorted(keys.items())) or "no trust domain",
        )

    def _withdraw(self, kind: str, why: str) -> None:
        what = "the sidecar's identity" if kind == "x509" else "the JWT bundles"
        with self._lock:
            if kind == "x509":
                had = self._svid is not None
                self._svid = None
                if had or not self._svid_gone.startswith("the Workload API withdrew"):
                    self._svid_gone = (
                        f"the Workload API withdrew {what}: {why}" if had
                        else f"the Workload API has not issued {what}: {why}"
                    )
            else:
                had = self._jwt is not None
                self._jwt = None
                if had or not self._jwt_gone.startswith("the Workload API withdrew"):
                    self._jwt_gone = (
                        f"the Workload API withdrew {what}: {why}" if had
                        else f"the Workload API has not issued {what}: {why}"
                    )
        if had:
            log.warning("identity: the Workload API withdrew the %s (%s); calls are denied until it issues one",
                        "X.509-SVID" if kind == "x509" else "JWT bundles", why)

    # ------------------------------------------------------------ streams
    def _supervise(self, kind: str) -> None:
        state = self._streams[kind]
        while not self._closed.is_set():
            try:
                for attempt in tenacity.Retrying(
                    retry=tenacity.retry_if_exception_type(_StreamDown),
                    wait=tenacity.wait_exponential(multiplier=self._backoff_initial, max=self._backoff_max)
                    + tenacity.wait_random(0, self._backoff_initial),
                    sleep=self._sleep,
                    before_sleep=lambda rs, s=state: self._log_retry(s, rs),
                    reraise=True,
                ):
                    with attempt:
                        session = self._open(kind, state)
            except _Closed:
                return
            except Exception:  # never let the supervisor die
                log.exception("identity: %s watcher failed unexpectedly; restarting", state.name)
                self._sleep(self._backoff_max)
                continue
            # Streaming: wait for the end (or close). A stream that stays open
            # while the SVID expires unrotated may be wedged: reopen it once.
            stale = False
            while not session.ended.wait(0.2):
                if self._closed.is_set():
                    return
                if kind == "x509" and self._expired_unrotated():
                    stale = True
                    break
            error = session.error if not stale else None
            self._teardown(state)
            if self._closed.is_set():
                return
            why = "the SVID expired without a rotation on the open stream" if stale else _describe(error)
            with self._lock:
                state.last_error = why
            if _withdrawn(error):
                self._withdraw(kind, why)
            else:
                log.warning("identity: Workload API %s stream ended: %s; reconnecting", state.name, why)

    def _expired_unrotated(self) -> bool:
        with self._lock:
            held = self._svid
            if held is None or self._clock() < held.expires_at or self._stale_version == held.version:
                return False
            self._stale_version = held.version
        return True

    def _sleep(self, seconds: float) -> None:
        if self._closed.wait(seconds):
            raise _Closed()

    def _log_retry(self, state: _StreamState, retry_state: tenacity.RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        n = retry_state.attempt_number
        level = logging.WARNING if n == 1 or n % 10 == 0 else logging.INFO
        log.log(level, "identity: waiting for the Workload API %s at %s: %s; retrying in %.1fs (attempt %d)",
                state.name, self.endpoint, exc, wait, n)

    def _open(self, kind: str, state: _StreamState) -> _Session:
        if self._closed.is_set():
            raise _Closed()
        with self._lock:
            state.attempts += 1
        path = socket_path(self.endpoint)
        if not os.path.exists(path):
            self._fail(state, f"socket {path} does not exist yet")
        try:
            client = WorkloadApiClient(self.endpoint)
        except ArgumentError as exc:  # e.g. the socket vanished between the check and here
            self._fail(state, str(exc))
        apply = self._apply_x509 if kind == "x509" else self._apply_jwt
        session = _Session(apply)
        if kind == "x509":
            handle = client.stream_x509_contexts(session.on_success, session.on_error, retry_connect=False)
        else:
            handle = client.stream_jwt_bundles(session.on_success, session.on_error, retry_connect=False)
        state.client, state.handle, state.session = client, handle, session
        deadline = time.monotonic() + self._answer_timeout
        while not session.first.is_set() and not session.ended.is_set():
            if self._closed.is_set():
                self._teardown(state)
                raise _Closed()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            session.first.wait(min(0.05, remaining))
        if session.first.is_set():
            with self._lock:
                state.last_error = ""
            return session
        error = session.error
        self._teardown(state)
        if session.ended.is_set():
            why = _describe(error)
            if _withdrawn(error):
                self._withdraw(kind, why)
            self._fail(state, why)
        self._fail(state, f"no answer within {self._answer_timeout:g}s (is the agent hung?)")

    def _fail(self, state: _StreamState, why: str) -> NoReturn:
        with self._lock:
            state.last_error = why
        raise _StreamDown(why)

    @staticmethod
    def _teardown(state: _StreamState) -> None:
        session, handle, client = state.session, state.handle, state.client
        state.session = state.handle = state.client = None
        if session is not None:
            session.cancelled = True
        if handle is not None:
            try:
                handle.cancel()
            except Exception:
                pass
        if client is not None:
            try:
                client.close()
            except Exception:
                pass


class WorkloadApiResolver:
    """`workload_api`: a caller on the pod's unix socket is the pod's SVID holder.

    This assumes SPIRE registers the pod (not only the sidecar container), so
    the SVID the sidecar receives is the identity of every container in the
    pod, the agent included; docs/identity.md shows the registration.
    """

    source_name = "workload_api"

    def __init__(self, source: WorkloadApiSource):
        self._source = source

    def applies(self, peer: PeerInfo) -> bool:
        return peer.transport == "unix"

    def resolve(self, peer: PeerInfo) -> CallerIdentity:
        if peer.transport != "unix":
            raise IdentityError(
                f"workload_api: only callers on the pod's unix socket get the pod identity; this call came over {peer.transport}"
            )
        try:
            held = self._source.x509()
        except SvidUnavailable as exc:
            raise IdentityError(f"workload_api: {exc.reason}") from None
        return CallerIdentity(Subject(held.spiffe_id, source="workload_api", svid_expires_at=rfc3339(held.expires_at)))

    def health(self) -> tuple[bool, str]:
        return self._source.health()
