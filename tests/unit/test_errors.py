"""The 504 a request gets when every attempt timed out names the limit that cut them."""

from __future__ import annotations

from smart.edge import errors
from smart.hedging.hedge import AllAttemptsFailed, HedgeResult, Trigger
from smart.hedging.outcome import Kind, Limit, Outcome


def test_attempts_cut_by_different_limits_are_counted_by_limit() -> None:
    def timed_out(number: int, limit: Limit) -> Outcome:
        return Outcome(number, Kind.TIMEOUT, 0.0, 0.1, limit=limit)

    attempts = (
        timed_out(1, Limit.ATTEMPT),
        timed_out(2, Limit.CONNECT),
        timed_out(3, Limit.CONNECT),
    )
    result = HedgeResult(None, attempts, Trigger.DELAY, 0, 3.3)
    error = errors.from_hedge_error(
        AllAttemptsFailed(result), None, attempt_limit_ms=3000, connect_limit_ms=1000
    )
    assert (error.status, error.code) == (504, "upstream_timeout")
    assert error.message == (
        "all 3 upstream attempts timed out: 2 while connecting "
        "(SMART_CONNECT_TIMEOUT_MS: 1000 ms), 1 before answering in full "
        "(SMART_ATTEMPT_TIMEOUT_MS: 3000 ms)"
    )


def test_attempts_that_could_not_connect_in_time_name_the_connect_limit() -> None:
    attempts = (
        Outcome(1, Kind.CONNECT_ERROR, 0.0, 1.0, limit=Limit.CONNECT),
        Outcome(2, Kind.TLS_ERROR, 1.0, 1.0, limit=Limit.CONNECT),
        Outcome(3, Kind.TLS_ERROR, 1.0, 1.0, limit=Limit.CONNECT),
    )
    result = HedgeResult(None, attempts, Trigger.EARLY_FAILURE, 0, 2.0)
    error = errors.from_hedge_error(
        AllAttemptsFailed(result), 5000, attempt_limit_ms=3000, connect_limit_ms=1000
    )
    assert (error.status, error.code) == (502, "upstream_failed")
    assert error.message == (
        "all 3 upstream attempts failed to connect within SMART_CONNECT_TIMEOUT_MS "
        "(1000 ms each; TLS handshake included)"
    )


def test_attempts_that_failed_otherwise_get_the_plain_502_message() -> None:
    attempts = (
        Outcome(1, Kind.CONNECT_ERROR, 0.0, 0.001),  # refused: no limit ran out
        Outcome(2, Kind.TLS_ERROR, 0.0, 1.0, limit=Limit.CONNECT),
    )
    result = HedgeResult(None, attempts, Trigger.EARLY_FAILURE, 0, 1.0)
    error = errors.from_hedge_error(
        AllAttemptsFailed(result), None, attempt_limit_ms=3000, connect_limit_ms=1000
    )
    assert error.message == "all 2 upstream attempts failed"
