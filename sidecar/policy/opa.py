"""The OPA engine: decisions from the OPA REST API of the OPA container beside the sidecar.

Each decision is `POST {url}/v1/data/sidecar/decision?provenance=true&strict-builtin-errors=true` with
`{"input": <input document>}`. OPA answers `{"result": ..., "decision_id":
..., "provenance": {"bundles": {<name>: {"revision": ...}}}}`; an undefined
decision is a 200 with no `result`; errors are `{"code": ..., "message": ...}`
with a 4xx or 5xx status.

Failing closed, always naming OPA in the reason:

- the whole call, retries included, has `policy.timeout_ms` (100 ms by
  default); past it the call is a deny `policy_unavailable: OPA at ... did
  not answer within 100 ms` (docs/configuration.md: OPA timeouts are
  policy_unavailable);
- connection errors and 5xx answers that are not OPA's own error shape
  (a proxy's 503, a crash) are retried (tenacity, exponential back-off) while
  the budget lasts; nothing else is retried (an OPA `{"code": ...}` 500 is
  its deterministic answer for this input);
- queries are sent with `strict-builtin-errors=true`, so a built-in error
  fails the decision (a deny) as in the embedded engine, instead of OPA's
  default of making the expression undefined;
- a circuit breaker (sidecar/policy/breaker.py) opens after
  `policy.opa.breaker_failures` consecutive failed calls (unreachable, timed
  out, a 5xx not in OPA's error shape, a 200 that is not JSON): calls
  then fail fast without touching the network until a probe after the
  cool-down succeeds. An answer in OPA's shape — a 4xx, a 500 `{"code": ...}`
  evaluation error, an undefined or malformed decision — is a deny but proves
  OPA is up, so a policy that fails on some inputs cannot open the breaker
  for every call;
- a 200 whose `result` is missing (undefined: e.g. the bundle OPA serves has
  no decision rule) or not a decision is `policy_malformed`.

The sidecar still reads the local bundle directory (`policy.dir`, the same
files mounted into OPA) for the tool catalog, reloaded when it changes.
`revision` is OPA's bundle revision from `provenance` when OPA reports a
non-empty one, else that local bundle's digest.

Why aiohttp and not `opa-python-client`: see docs/deploy.md ("OPA client").
In short, its AsyncOpaClient.query_rule drops OPA's error body on non-2xx
answers (raise_for_status), its health check returns a bare bool, its
built-in retry sleeps 0.3 s / 0.6 s (three to six times the whole budget),
and its timeout is per session, not per call. This module uses the
aiohttp session the client is built on directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, stop_before_delay, wait_exponential

from sidecar.policy.breaker import CLOSED, OPEN, Admission, CircuitBreaker
from sidecar.policy.bundle import BundleError, PolicyBundle, load_bundle
from sidecar.policy.decision import Decision, MalformedDecision, parse_decision

log = logging.getLogger(__name__)

DECISION_PATH = "sidecar/decision"
_MAX_TEXT = 300


class _Failure(Exception):
    """A failed attempt, as "<code>: OPA at <url> <detail>".

    `retryable`: a connection error or a 5xx; `counts`: it is OPA's fault (fed to the breaker).
    """

    def __init__(self, code: str, url: str, detail: str, *, retryable: bool = False, counts: bool = True):
        super().__init__(detail)
        self.code = code
        self.url = url
        self.detail = detail
        self.retryable = retryable
        self.counts = counts

    @property
    def reason(self) -> str:
        return f"{self.code}: OPA at {self.url} {self.detail}"


class _Retryable(_Failure):
    def __init__(self, code: str, url: str, detail: str, *, counts: bool = True):
        super().__init__(code, url, detail, retryable=True, counts=counts)


def _short(text: Any) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`')


def _without_values(text: str) -> str:
    """OPA quotes the operands of a failed built-in ("parsing time \"...\""): they may be an
    agent's arguments, and reasons are recorded and exported in clear, so quoted values go."""
    return _QUOTED.sub('"…"', text)


def _opa_error(raw: bytes) -> str:
    """OPA's error body `{"code", "message", "errors"?}` as one line (quoted values removed), or the raw text."""
    try:
        body = json.loads(raw)
    except ValueError:
        return _short(_without_values(raw.decode("utf-8", "replace"))) or "(empty body)"
    if not isinstance(body, dict):
        return _short(_without_values(json.dumps(body)))
    code = body.get("code")
    message = body.get("message") or body.get("error") or ""
    errors = body.get("errors") if isinstance(body.get("errors"), list) else []
    details = [e.get("message") for e in errors if isinstance(e, dict) and e.get("message")]
    text = " ".join(str(part) for part in (code and f"{code}:", message) if part)
    if details:
        text += " (" + "; ".join(str(d) for d in details[:3]) + ")"
    return _short(_without_values(text or json.dumps(body)))


def _is_opa_error(raw: bytes) -> bool:
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("code"), str) and bool(body["code"])


def _connection_problem(exc: BaseException) -> str:
    """A short, stable description of why a connection to OPA failed."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "closed the connection without answering"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return "is unreachable: connection refused"
        return f"is unreachable: {_short(os_error.strerror or os_error) or type(os_error).__name__}"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"broke off its answer: {_short(exc) or type(exc).__name__}"
    if isinstance(exc, aiohttp.ClientOSError) and exc.strerror:
        return f"is unreachable: {_short(exc.strerror)}"
    return f"is unreachable: {_short(exc) or type(exc).__name__}"


def revision_from_provenance(provenance: Any) -> str:
    """The bundle revision OPA reports: one bundle's revision, or "name=rev,..." for several; "" if none."""
    if not isinstance(provenance, dict) or not isinstance(provenance.get("bundles"), dict):
        return ""
    found = sorted(
        (name, info["revision"])
        for name, info in provenance["bundles"].items()
        if isinstance(info, dict) and isinstance(info.get("revision"), str) and info["revision"]
    )
    if not found:
        return ""
    if len(found) == 1:
        return found[0][1]
    return ",".join(f"{name}={revision}" for name, revision in found)


class OpaEngine:
    name = "opa"

    def __init__(
        self,
        directory: str | Path,
        *,
        url: str = "http://127.0.0.1:8181",
        timeout_ms: int = 100,
        retries: int = 2,
        retry_backoff_ms: int = 5,
        breaker_failures: int = 5,
        breaker_cooldown_ms: int = 2000,
        health_interval_ms: int = 1000,
        health_timeout_ms: int = 500,
        max_connections: int = 32,
        reload: bool = True,
    ):
        self._directory = Path(directory)
        self.url = url.rstrip("/")
        # strict-builtin-errors: a built-in error fails the query, as in the embedded engine (parity),
        # instead of OPA's default of quietly making the expression undefined.
        self._decision_url = f"{self.url}/v1/data/{DECISION_PATH}?provenance=true&strict-builtin-errors=true"
        self._health_url = f"{self.url}/health?bundles=true"
        self._budget = timeout_ms / 1000
        self._retries = retries
        self._backoff = retry_backoff_ms / 1000
        self._health_interval = health_interval_ms / 1000
        self._health_timeout = health_timeout_ms / 1000
        self._max_connections = max_connections
        self._reload = reload
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_ms / 1000)
        self._bundle: PolicyBundle | None = None
        self._opa_revision = ""
        self._opa_health: tuple[bool, str] = (False, "not checked yet")
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self.last_reload_error: str | None = None

    @classmethod
    def from_config(cls, policy: Any) -> "OpaEngine":
        """Build from a `sidecar.config.PolicyConfig` (policy.dir, policy.timeout_ms, policy.opa.*)."""
        opa = policy.opa
        return cls(
            policy.dir,
            url=opa.url,
            timeout_ms=policy.timeout_ms,
            retries=opa.retries,
            retry_backoff_ms=opa.retry_backoff_ms,
            breaker_failures=opa.breaker_failures,
            breaker_cooldown_ms=opa.breaker_cooldown_ms,
            health_interval_ms=opa.health_interval_ms,
            health_timeout_ms=opa.health_timeout_ms,
            max_connections=opa.max_connections,
            reload=policy.reload,
        )

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Load the local bundle (BundleError if it cannot be read), open the pool, check OPA once.

        OPA not answering yet is not an error here: in a pod the sidecar may
        start first; calls are denied and health is NOT_SERVING until it does.
        """
        self._bundle = await asyncio.to_thread(load_bundle, self._directory)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        await self.check_health()
        self._tasks.append(asyncio.create_task(self._poll_health(), name="opa-health"))
        if self._reload:
            self._tasks.append(asyncio.create_task(self._watch(), name="opa-catalog-reload"))
        log.info("OPA engine: deciding through %s (%s)", self.url, self._opa_health[1])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def reload(self) -> bool:
        """Re-read the local bundle (catalog and fallback revision); keep the old one if it is bad."""
        try:
            bundle = await asyncio.to_thread(load_bundle, self._directory)
        except BundleError as exc:
            self.last_reload_error = str(exc)
            log.error("local policy bundle reload rejected, keeping %s: %s", self.local_revision, exc)
            return False
        self.last_reload_error = None
        if self._bundle is None or bundle.revision != self._bundle.revision:
            self._bundle = bundle
            log.info("local policy bundle reloaded: %s", bundle.revision)
        return True

    async def _watch(self) -> None:
        from watchfiles import awatch

        async for _changes in awatch(self._directory, debounce=200, step=50):
            await self.reload()

    # --- health --------------------------------------------------------------

    async def check_health(self) -> tuple[bool, str]:
        """One `GET /health?bundles=true`: OPA is up and every configured bundle is activated."""
        assert self._session is not None
        try:
            async with asyncio.timeout(self._health_timeout):
                async with self._session.get(self._health_url) as response:
                    status, raw = response.status, await response.read()
        except TimeoutError:
            budget = f"{self._health_timeout * 1000:.0f} ms"
            result = (False, f"OPA at {self.url} did not answer its health check within {budget}")
        except aiohttp.ClientError as exc:
            result = (False, f"OPA at {self.url} {_connection_problem(exc)}")
        else:
            if status == 200:
                result = (True, f"OPA at {self.url} is healthy, bundles activated")
            else:
                result = (False, f"OPA at {self.url} is not healthy: {status} {_opa_error(raw)}")
        if result[0] != self._opa_health[0]:
            (log.info if result[0] else log.warning)("%s", result[1])
        self._opa_health = result
        return result

    async def _poll_health(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval)
            try:
                await self.check_health()
            except Exception as exc:  # never let the poller die
                self._opa_health = (False, f"OPA health check failed: {type(exc).__name__}: {_short(exc)}")

    def health(self) -> tuple[bool, str]:
        if self._bundle is None:
            return False, f"no local policy bundle loaded from {self._directory}"
        opa_ok, opa_detail = self._opa_health
        serving = opa_ok and self.breaker.state != OPEN
        detail = f"{opa_detail}; {self.breaker.describe()}; serving policy {self.revision}"
        if self.last_reload_error:
            detail += f"; last local bundle reload rejected: {self.last_reload_error}"
        return serving, detail

    # --- catalog and revision -------------------------------------------------

    @property
    def local_revision(self) -> str:
        return self._bundle.revision if self._bundle else ""

    @property
    def revision(self) -> str:
        return self._opa_revision or self.local_revision

    def catalog_entry(self, tool: str) -> dict | None:
        return self._bundle.catalog_entry(tool) if self._bundle else None

    # --- evaluation ----------------------------------------------------------

    def _failed(self, reason: str) -> Decision:
        return Decision.failed(reason, engine=self.name, policy_revision=self.revision)

    async def evaluate(self, input_document: dict) -> Decision:
        try:
            payload = json.dumps({"input": input_document}, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return self._failed(
                f"policy_error: OPA at {self.url} was not called: the input cannot be sent as JSON: {_short(exc)}"
            )
        if self._session is None:
            return self._failed(f"policy_unavailable: the OPA engine for {self.url} is not started")
        admission = self.breaker.admit()
        if not admission.allowed:
            return self._failed(
                f"policy_unavailable: OPA at {self.url} is not being called: circuit breaker open after "
                f"repeated failures (last: it {self.breaker.last_error}); "
                f"next probe in {admission.retry_in * 1000:.0f} ms"
            )
        settled = False
        try:
            try:
                body = await self._post(payload.encode("utf-8"))
            except _Failure as failure:
                if failure.counts:
                    self._note_failure(admission, failure.detail)
                else:
                    self.breaker.record_success(admission)
                settled = True
                return self._failed(failure.reason)
            self.breaker.record_success(admission)
            settled = True
            return self._decision_from(body)
        except Exception as exc:  # evaluate never raises: anything unexpected is a deny
            detail = f"could not be used: {type(exc).__name__}: {_short(exc)}"
            reason = f"policy_error: OPA at {self.url} {detail}"
            if not settled:
                self._note_failure(admission, detail)
                settled = True
            return self._failed(reason)
        finally:
            if not settled:  # cancelled: neither a success nor OPA's fault
                self.breaker.release(admission)

    def _note_failure(self, admission: Admission, reason: str) -> None:
        was_closed = self.breaker.state == CLOSED
        self.breaker.record_failure(admission, reason)
        if self.breaker.state != OPEN:
            return
        if admission.probe:
            log.info("OPA probe failed, circuit breaker stays open: %s", reason)
        elif was_closed:
            log.warning(
                "OPA circuit breaker open after %d consecutive failures; next probe in %.0f ms: %s",
                self.breaker.consecutive_failures,
                self.breaker.cooldown * 1000,
                reason,
            )

    async def _post(self, payload: bytes) -> dict:
        """POST within the budget, retrying connection errors and 5xx; raise _Failure."""
        attempts = 0
        last: _Failure | None = None
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._retries + 1) | stop_before_delay(self._budget),
            wait=wait_exponential(multiplier=self._backoff, min=self._backoff, max=max(self._backoff, self._budget)),
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        try:
            async with asyncio.timeout(self._budget):
                async for attempt in retrying:
                    with attempt:
                        attempts += 1
                        try:
                            return await self._attempt(payload)
                        except _Retryable as failure:
                            last = failure
                            raise
        except TimeoutError:
            detail = f"did not answer within {self._budget * 1000:.0f} ms"
            if last is not None:
                detail += f" ({attempts} attempts; before that it {last.detail})"
            raise _Failure("policy_unavailable", self.url, detail) from None
        except _Retryable as failure:
            if attempts > 1:
                failure.detail += f" (after {attempts} attempts)"
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, payload: bytes) -> dict:
        assert self._session is not None
        url = self.url
        try:
            async with self._session.post(self._decision_url, data=payload) as response:
                status, raw = response.status, await response.read()
        except aiohttp.ClientResponseError as exc:
            raise _Retryable("policy_unavailable", url, f"broke off its answer: {_short(exc)}") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _Retryable("policy_unavailable", url, _connection_problem(exc)) from None
        if status >= 500:
            if _is_opa_error(raw):
                # OPA's own error shape ({"code": ...}: the policy failed on this input, e.g. a built-in
                # error under strict-builtin-errors) is OPA up and deterministic: a deny, not retried, and
                # not held against OPA's availability (a policy failing on some inputs must not open the
                # breaker for every call).
                raise _Failure("policy_error", url, f"answered {status}: {_opa_error(raw)}", counts=False)
            # Anything else (a proxy's 502/503, a crashing process) is retried and counts.
            raise _Retryable("policy_error", url, f"answered {status}: {_opa_error(raw)}")
        if status != 200:
            # OPA is up and refused this query (400: bad input...): a deny, but not the breaker's business.
            raise _Failure("policy_error", url, f"refused the query: {status} {_opa_error(raw)}", counts=False)
        try:
            body = json.loads(raw)
        except ValueError:
            text = _short(raw[:120].decode("utf-8", "replace"))
            raise _Failure("policy_error", url, f"answered 200 with a body that is not JSON: {text!r}") from None
        if not isinstance(body, dict):
            raise _Failure("policy_error", url, f"answered 200 with a JSON {type(body).__name__}, not an object")
        return body

    def _decision_from(self, body: dict) -> Decision:
        revision = revision_from_provenance(body.get("provenance"))
        if revision:
            self._opa_revision = revision
        policy_revision = self.revision
        decision_id = body.get("decision_id") if isinstance(body.get("decision_id"), str) else ""
        if "result" not in body:
            return self._failed(
                f"policy_malformed: OPA at {self.url} answered no decision: data.{DECISION_PATH.replace('/', '.')} "
                "is undefined (does the bundle OPA serves have the decision rule?)"
            )
        try:
            decision = parse_decision(body["result"], engine=self.name, policy_revision=policy_revision)
        except MalformedDecision as exc:
            return self._failed(f"policy_malformed: OPA at {self.url} answered a malformed decision: {exc}")
        return replace(decision, engine_decision_id=decision_id)
