"""Decisions from OPA's REST API: `OpaClient.decide(input_document) -> Decision`, never raising.

Each decision is `POST {url}/v1/data/sidecar/decision?provenance=true&strict-builtin-errors=true`
with `{"input": <input document>}`. OPA answers `{"result": ..., "provenance":
{"bundles": {<name>: {"revision": ...}}}, "decision_id"?: ...}`; an undefined
decision is a 200 with no `result`; errors are `{"code": ..., "message": ...}`
with a 4xx or 5xx status. `url` is `unix:///path/opa.sock` (the managed OPA,
sidecar/policy/opa/runner.py) or `http(s)://host:port` (an OPA beside the
sidecar): the same code path decides for both.

Failing closed, always naming OPA in the reason (a deny with `error` set):

- `overloaded`: more than `max_in_flight` decisions are already waiting for
  OPA; the call is denied at once instead of queueing into the time budget;
- `policy_timeout`: the whole call, retries included, took longer than
  `timeout_ms`;
- `policy_unavailable`: OPA cannot be reached, or the circuit breaker
  (sidecar/policy/breaker.py) is open after `breaker_failures` consecutive
  failures (unreachable, timed out, a 5xx not in OPA's error shape, a 200
  that is not JSON); it lets one probe through after the cool-down. A call
  that timed out while OPA answered others, or while others waited with it
  and OPA passed its health check, is overload, not OPA failing: it does not
  count;
- `policy_error`: OPA refused the query or failed evaluating it (with
  `strict-builtin-errors`, a built-in error fails the decision instead of
  quietly making an expression undefined);
- `policy_malformed`: the decision is undefined or not a decision
  (sidecar/policy/decision.py).

Connection errors and 5xx answers that are not OPA's own error shape are
retried (tenacity, exponential back-off from `retry_backoff_ms`) while the
budget lasts; nothing else is retried (an OPA `{"code": ...}` 500 is its
deterministic answer for this input). An answer in OPA's shape proves OPA is
up, so a policy failing on some inputs cannot open the breaker for every call.

The input is sent exactly as given (`request_body`): integers exact at any
size, floats with all their digits (the shortest form that reads back to
the same double), strings whole, U+0000 included (the gate refuses such
calls before they get here, sidecar/calls.py). NaN and infinities are not
JSON: such an input is not sent (`policy_error`).

`ready()` is (OPA answers `GET /health?bundles=true` with 200 and the
breaker is not open, detail), polled every `health_interval_ms` from a worker
thread (probe.py): under saturation the event loop is late for everything, and
a check timed on it would call a healthy OPA down.

The HTTP exchange is transport.py's pool of keep-alive connections (not
aiohttp: it is the one HTTP request on every tool call, see there). Why not
`opa-python-client`: its AsyncOpaClient.query_rule drops OPA's error body on
non-2xx answers, its health check returns a bare bool, its retry sleeps
0.3 s / 0.6 s (several times the whole budget) and its timeout is per
session, not per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass, replace
from typing import Any

import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, stop_before_delay, wait_exponential

from sidecar.canonical import plain_depth
from sidecar.policy.breaker import CLOSED, OPEN, Admission, CircuitBreaker
from sidecar.policy.decision import Decision, MalformedDecision, parse_decision
from sidecar.policy.opa.probe import probe
from sidecar.policy.opa.transport import ConnectionProblem, HttpPool
from sidecar.reasons import OVERLOADED, POLICY_ERROR, POLICY_MALFORMED, POLICY_TIMEOUT, POLICY_UNAVAILABLE, Reason

log = logging.getLogger(__name__)

ENGINE = "opa"
DECISION_PATH = "sidecar/decision"
HEALTH_PATH = "/health?bundles=true"  # 200 once OPA is up and every bundle is activated
_MAX_TEXT = 300


class _Failure(Exception):
    """A failed attempt, as "<code>: OPA at <url> <detail>"; `code` is a POLICY_* code (sidecar/reasons.py).

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
    def reason(self) -> Reason:
        return Reason(self.code, f"OPA at {self.url} {self.detail}")


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


def request_body(input_document: Any) -> bytes:
    """`{"input": input_document}` as UTF-8 JSON for OPA's Data API (POST /v1/data/{path}).

    A plain document (canonical.plain_depth: the shape of nearly every call) is written by
    orjson, 20 times faster; any other by `json.dumps`, which writes integers past 64 bits
    exactly. Raises ValueError for NaN, infinities and lone surrogates, TypeError for a
    value that is not JSON.
    """
    if plain_depth(input_document) is not None:
        return orjson.dumps({"input": input_document})
    return json.dumps(
        {"input": input_document}, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


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


@dataclass(frozen=True)
class OpaClientOptions:
    """How one OpaClient calls OPA (policy.timeout_ms and policy.opa.* in docs/configuration.md)."""

    timeout_ms: int = 100
    retries: int = 2
    retry_backoff_ms: int = 5
    breaker_failures: int = 5
    breaker_cooldown_ms: int = 2000
    health_interval_ms: int = 1000
    health_timeout_ms: int = 500
    max_connections: int = 32
    max_in_flight: int = 64


class OpaClient:
    """One OPA, one keep-alive connection pool. `async with OpaClient(url, options) as decisions:`."""

    def __init__(self, url: str, options: OpaClientOptions = OpaClientOptions(), *, revision: str = ""):
        """`revision`: the bundle revision OPA is known to serve before it first reports one (a managed
        OPA's, from the files it was built from), so a decision failing before then still names it."""
        self.url = url.rstrip("/")
        self.options = options
        # strict-builtin-errors: a built-in error fails the decision (a deny naming it) instead of
        # OPA's default of quietly making the expression undefined.
        self._decision_path = f"/v1/data/{DECISION_PATH}?provenance=true&strict-builtin-errors=true"
        self._budget = options.timeout_ms / 1000
        self._backoff = options.retry_backoff_ms / 1000
        self.breaker = CircuitBreaker(options.breaker_failures, options.breaker_cooldown_ms / 1000)
        self._pool: HttpPool | None = None
        self._poller: asyncio.Task | None = None
        self._health: tuple[bool, str] = (False, f"OPA at {self.url} not checked yet")
        self.in_flight = 0
        self._last_answer = 0.0  # loop time of OPA's last answer
        self.revision = revision  # the bundle revision OPA last reported

    async def __aenter__(self) -> "OpaClient":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the connection pool, check OPA once and keep checking it; OPA being down is no error here."""
        self._pool = HttpPool(self.url, max_connections=self.options.max_connections)
        await self.check_health()
        self._poller = asyncio.create_task(self._poll_health(), name=f"opa-health {self.url}")

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.aclose()

    async def drained(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until no decision is in flight: before closing a client that was replaced."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.in_flight:
                    await asyncio.sleep(0.005)

    # --- health --------------------------------------------------------------

    async def check_health(self) -> tuple[bool, str]:
        """One `GET /health?bundles=true`: OPA is up and every bundle is activated.

        Asked from a worker thread (probe.py), so a saturated event loop is not mistaken for a slow OPA."""
        if self._pool is None:
            return (False, f"the OPA client for {self.url} is closed")
        answer = await probe(self.url, HEALTH_PATH, self.options.health_timeout_ms / 1000)
        if answer.problem:
            result = (False, f"OPA at {self.url} {answer.problem} (health check)")
        elif answer.status == 200:
            result = (True, f"OPA at {self.url} is healthy, bundles activated")
        else:
            result = (False, f"OPA at {self.url} is not healthy: {answer.status} {_opa_error(answer.body)}")
        if result[0] != self._health[0]:
            (log.info if result[0] else log.warning)("%s", result[1])
        self._health = result
        return result

    async def _poll_health(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_interval_ms / 1000)
            try:
                await self.check_health()
            except Exception as exc:  # never let the poller die
                self._health = (False, f"OPA health check failed: {type(exc).__name__}: {_short(exc)}")

    def ready(self) -> tuple[bool, str]:
        """(OPA healthy and the breaker not open, detail)."""
        ok, detail = self._health
        return ok and self.breaker.state != OPEN, f"{detail}; {self.breaker.describe()}"

    # --- decisions -------------------------------------------------------------

    def _failed(self, reason: Reason) -> Decision:
        return Decision.failed(str(reason), engine=ENGINE, policy_revision=self.revision)

    async def decide(self, input_document: dict) -> Decision:
        """OPA's `data.sidecar.decision` for this input, or a deny naming why there is none. Never raises."""
        if self.in_flight >= self.options.max_in_flight:
            return self._failed(Reason(
                OVERLOADED,
                f"{self.in_flight} decisions are already waiting for OPA at {self.url} "
                f"(the limit is {self.options.max_in_flight}); denied at once instead of queueing",
            ))
        try:
            payload = request_body(input_document)
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError (a lone surrogate) is a ValueError
            return self._failed(Reason(
                POLICY_ERROR, f"OPA at {self.url} was not called: the input cannot be sent as JSON: {_short(exc)}"
            ))
        if self._pool is None:
            return self._failed(Reason(POLICY_UNAVAILABLE, f"the OPA client for {self.url} is not started"))
        admission = self.breaker.admit()
        if not admission.allowed:
            return self._failed(Reason(
                POLICY_UNAVAILABLE,
                f"OPA at {self.url} is not being called: circuit breaker open after "
                f"repeated failures (last: it {self.breaker.last_error}); "
                f"next probe in {admission.retry_in * 1000:.0f} ms",
            ))
        self.in_flight += 1
        alone = self.in_flight == 1
        settled = False
        started = asyncio.get_running_loop().time()
        try:
            try:
                body = await self._post(payload)
            except _Failure as failure:
                if failure.code == POLICY_TIMEOUT and self._overloaded(started, alone):
                    # Overload, not OPA failing: not held against OPA, or overload would open
                    # the breaker and turn a slow sidecar into one that denies everything.
                    self.breaker.release(admission)
                elif failure.counts:
                    self._note_failure(admission, failure.detail)
                else:
                    self.breaker.record_success(admission)
                settled = True
                return self._failed(failure.reason)
            self._last_answer = asyncio.get_running_loop().time()
            self.breaker.record_success(admission)
            settled = True
            return self._decision_from(body)
        except Exception as exc:  # decide never raises: anything unexpected is a deny
            detail = f"could not be used: {type(exc).__name__}: {_short(exc)}"
            if not settled:
                self._note_failure(admission, detail)
                settled = True
            return self._failed(Reason(POLICY_ERROR, f"OPA at {self.url} {detail}"))
        finally:
            self.in_flight -= 1
            if not settled:  # cancelled: neither a success nor OPA's fault
                self.breaker.release(admission)

    def _overloaded(self, started: float, alone: bool) -> bool:
        """Did a call that timed out wait behind others rather than on a failing OPA?

        Yes when OPA answered another call while it waited, or when other calls were waiting
        with it and OPA still passes its health check (a saturated event loop delays every
        answer at once; a hung OPA fails its health check too).
        """
        return self._last_answer > started or (not alone and self._health[0])

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
        started = asyncio.get_running_loop().time()
        try:
            # The first attempt without the retry machinery: it is the hot path.
            async with asyncio.timeout(self._budget):
                attempts = 1
                return await self._attempt(payload)
        except TimeoutError:
            raise _Failure(
                POLICY_TIMEOUT, self.url, f"did not answer within {self._budget * 1000:.0f} ms"
            ) from None
        except _Retryable as failure:
            if self.options.retries == 0:
                raise
            last = failure
        remaining = self._budget - (asyncio.get_running_loop().time() - started)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.options.retries) | stop_before_delay(max(0.0, remaining)),
            # The first pause is taken below; tenacity's come after: twice it, then doubling.
            wait=wait_exponential(multiplier=2 * self._backoff, max=max(self._backoff, self._budget)),
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                await asyncio.sleep(self._backoff)
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
            raise _Failure(POLICY_TIMEOUT, self.url, detail) from None
        except _Retryable as failure:
            if attempts > 1:
                failure.detail += f" (after {attempts} attempts)"
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, payload: bytes) -> dict:
        if self._pool is None:
            raise _Failure(POLICY_UNAVAILABLE, self.url, "is not being called: the client is closed")
        url = self.url
        try:
            response = await self._pool.post(self._decision_path, payload, content_type="application/json")
        except ConnectionProblem as problem:
            raise _Retryable(POLICY_UNAVAILABLE, url, _short(problem.detail)) from None
        status, raw = response.status, response.body
        if status >= 500:
            if _is_opa_error(raw):
                # OPA's own error shape: the policy failed on this input. Deterministic, not retried,
                # and not held against OPA's availability.
                raise _Failure(POLICY_ERROR, url, f"answered {status}: {_opa_error(raw)}", counts=False)
            raise _Retryable(POLICY_ERROR, url, f"answered {status}: {_opa_error(raw)}")
        if status != 200:
            raise _Failure(POLICY_ERROR, url, f"refused the query: {status} {_opa_error(raw)}", counts=False)
        try:
            body = orjson.loads(raw)  # strict RFC 8259: no NaN, no Infinity, no overflow to inf
        except ValueError as exc:  # orjson.JSONDecodeError
            text = _short(raw[:120].decode("utf-8", "replace"))
            raise _Failure(
                POLICY_ERROR, url, f"answered 200 with a body that cannot be read as JSON ({_short(exc)}): {text!r}"
            ) from None
        if not isinstance(body, dict):
            raise _Failure(POLICY_ERROR, url, f"answered 200 with a JSON {type(body).__name__}, not an object")
        return body

    def _decision_from(self, body: dict) -> Decision:
        revision = revision_from_provenance(body.get("provenance"))
        if revision:
            self.revision = revision
        decision_id = body.get("decision_id") if isinstance(body.get("decision_id"), str) else ""
        if "result" not in body:
            return self._failed(Reason(
                POLICY_MALFORMED,
                f"OPA at {self.url} answered no decision: data.{DECISION_PATH.replace('/', '.')} "
                "is undefined (does the bundle OPA serves have the decision rule?)",
            ))
        try:
            decision = parse_decision(body["result"], engine=ENGINE, policy_revision=self.revision)
        except MalformedDecision as exc:
            return self._failed(Reason(POLICY_MALFORMED, f"OPA at {self.url} answered a malformed decision: {exc}"))
        return replace(decision, engine_decision_id=decision_id)
