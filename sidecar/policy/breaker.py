"""A circuit breaker for a remote policy engine (the OPA REST engine).

    closed ──N consecutive failures──▶ open ──cool-down──▶ half-open
      ▲                                  ▲                    │
      └──────── probe succeeds ──────────┼── probe fails ─────┘

Closed: every call goes through. Open: calls are refused at once (the engine
answers a deny naming OPA without touching the network), so a dead OPA is not
hammered and agents get their deny in microseconds instead of after the whole
timeout budget. After the cool-down one call is let through as a probe while
the others keep being refused; its outcome closes or re-opens the breaker.

Single-threaded by design: it lives on the event loop that calls OPA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Admission:
    """Whether a call may go to OPA; `probe` marks the one half-open trial call."""

    allowed: bool
    probe: bool = False
    retry_in: float = 0.0  # seconds until the next probe, when refused


class CircuitBreaker:
    def __init__(self, failure_threshold: int, cooldown_seconds: float, clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown_seconds
        self._clock = clock
        self._state = CLOSED
        self._failures = 0  # consecutive
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.last_error = ""
        self.times_opened = 0

    @property
    def state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown:
            return HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def admit(self) -> Admission:
        state = self.state
        if state == CLOSED:
            return Admission(True)
        if state == HALF_OPEN and not self._probe_in_flight:
            self._state = HALF_OPEN
            self._probe_in_flight = True
            return Admission(True, probe=True)
        retry_in = max(0.0, self._opened_at + self.cooldown - self._clock())
        return Admission(False, retry_in=retry_in)

    def record_success(self, admission: Admission) -> None:
        if admission.probe:
            self._probe_in_flight = False
        # Any answer from OPA proves it is reachable: close from any state.
        self._state = CLOSED
        self._failures = 0
        self.last_error = ""

    def record_failure(self, admission: Admission, error: str) -> None:
        self.last_error = error
        if admission.probe:
            self._probe_in_flight = False
            self._open()
            return
        self._failures += 1
        if self._state == CLOSED and self._failures >= self.failure_threshold:
            self._open()

    def release(self, admission: Admission) -> None:
        """The admitted call ended without telling either way (e.g. it was cancelled)."""
        if admission.probe and self._probe_in_flight:
            self._probe_in_flight = False
            self._state = OPEN  # stay half-open-eligible: the cool-down has already passed

    def _open(self) -> None:
        if self._state != OPEN:
            self.times_opened += 1
        self._state = OPEN
        self._opened_at = self._clock()

    def describe(self) -> str:
        state = self.state
        if state == CLOSED:
            return "breaker closed" + (f" ({self._failures} consecutive failures)" if self._failures else "")
        if state == OPEN:
            left = max(0.0, self._opened_at + self.cooldown - self._clock())
            return f"breaker open, next probe in {left * 1000:.0f} ms (last: OPA {self.last_error})"
        return f"breaker half-open, probing (last: OPA {self.last_error})"
