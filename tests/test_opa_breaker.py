"""The circuit breaker in front of OPA: closed → open → half-open → closed, on a fake clock."""

from __future__ import annotations

import pytest

from sidecar.policy.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def fail(breaker: CircuitBreaker, error: str = "is unreachable: connection refused") -> None:
    admission = breaker.admit()
    assert admission.allowed
    breaker.record_failure(admission, error)


def test_opens_after_n_consecutive_failures_only(clock):
    breaker = CircuitBreaker(3, 2.0, clock)
    fail(breaker)
    fail(breaker)
    ok = breaker.admit()
    breaker.record_success(ok)  # a success resets the count
    assert breaker.consecutive_failures == 0
    fail(breaker)
    fail(breaker)
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN
    assert breaker.times_opened == 1
    refused = breaker.admit()
    assert not refused.allowed
    assert refused.retry_in == pytest.approx(2.0)
    assert "breaker open" in breaker.describe() and "connection refused" in breaker.describe()


def test_half_open_lets_exactly_one_probe_through(clock):
    breaker = CircuitBreaker(1, 2.0, clock)
    fail(breaker)
    clock.now += 1.999
    assert not breaker.admit().allowed
    clock.now += 0.001
    assert breaker.state == HALF_OPEN
    probe = breaker.admit()
    assert probe.allowed and probe.probe
    second = breaker.admit()
    assert not second.allowed  # others keep failing fast while the probe is out
    breaker.record_success(probe)
    assert breaker.state == CLOSED
    assert breaker.admit().allowed


def test_failed_probe_reopens_for_a_full_cooldown(clock):
    breaker = CircuitBreaker(2, 5.0, clock)
    fail(breaker)
    fail(breaker)
    clock.now += 5
    probe = breaker.admit()
    assert probe.probe
    breaker.record_failure(probe, "answered 500: internal_error: boom")
    assert breaker.state == OPEN
    assert breaker.times_opened == 2
    assert breaker.admit().retry_in == pytest.approx(5.0)
    assert "answered 500" in breaker.last_error


def test_cancelled_probe_frees_the_slot(clock):
    breaker = CircuitBreaker(1, 1.0, clock)
    fail(breaker)
    clock.now += 1
    probe = breaker.admit()
    breaker.release(probe)
    again = breaker.admit()
    assert again.allowed and again.probe


def test_threshold_must_be_positive():
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
