"""The benchmark's yardstick agrees with what the hedging rules give on paper."""

from __future__ import annotations

import pytest

from bench import ideal

#: Draws per estimate: enough for the shares below to be within a few tenths of a percent.
SAMPLES = 200_000
#: Attempt 1 wins before the 300 ms delay when it succeeds (80%) and its latency, uniform
#: in [100, 600] ms, is under 300 ms (40%): every other request starts both hedges.
WON_EARLY = 0.8 * 0.4


def test_calls_per_request_follow_from_how_often_attempt_1_wins_early() -> None:
    result = ideal.hedged(n=SAMPLES)
    assert result.calls_per_request == pytest.approx(1 + 2 * (1 - WON_EARLY), abs=0.01)


def test_without_hedging_every_failure_is_an_error() -> None:
    result = ideal.hedged(policy=ideal.Policy(fanout=0), n=SAMPLES)
    assert result.error_rate == pytest.approx(0.2, abs=0.005)
    assert result.calls_per_request == 1.0


def test_a_request_fails_only_when_all_three_attempts_fail() -> None:
    assert ideal.hedged(n=SAMPLES).error_rate == pytest.approx(0.2**3, abs=0.002)


def test_no_answer_comes_before_the_fastest_upstream_answer() -> None:
    result = ideal.hedged(n=SAMPLES)
    assert result.percentile(0) >= 100
    # The slowest: a hedge that hangs after attempt 1 failed at the delay, 300 + 3000 ms.
    assert result.percentile(100) <= 3300 + 1e-6


def test_fixed_mode_is_exactly_the_upstream_latency_and_one_call() -> None:
    result = ideal.fixed(100)
    assert result.percentile(50) == result.percentile(99.9) == 100
    assert result.calls_per_request == 1.0
