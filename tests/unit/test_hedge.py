"""The hedging algorithm with fake attempts: no sockets, no Flask.

Attempts are driven by events the test sets, so the order of things is fixed by the
test, not by sleeps; only the hedge delay itself is measured in time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from gevent.event import AsyncResult, Event
from gevent.pool import Pool

from smart.hedging.hedge import (
    AllAttemptsFailed,
    DeadlineExceeded,
    HedgePolicy,
    HedgeResult,
    Trigger,
    hedge,
)
from smart.hedging.outcome import Kind, Outcome

#: A hedge delay short enough to keep the suite fast, long enough that a busy 2-core
#: machine does not blur "before the delay" and "after the delay".
DELAY_S = 0.2
#: How late a timer may fire on a loaded shared machine (measured stalls reach tens
#: of ms under CPU contention); early is never allowed.
LATE_S = 0.15
#: A bound on waiting for something that should happen at once.
PROMPTLY_S = 1.0


def ok(number: int) -> Outcome:
    return Outcome(number, Kind.SUCCESS, 0.0, 0.0, status=200, body=b'{"time": 1}')


def failed(number: int) -> Outcome:
    return Outcome(number, Kind.HTTP_STATUS, 0.0, 0.0, status=503)


class Script:
    """Fake attempts whose outcomes the test releases one by one."""

    def __init__(self) -> None:
        self.release: dict[int, AsyncResult] = {n: AsyncResult() for n in (1, 2, 3, 4)}
        self.started: dict[int, float] = {}
        self.cleaned_up: list[int] = []
        self.t0 = time.monotonic()
        self.spawned = Event()

    def attempt(self, number: int, t0: float) -> Outcome:
        self.started[number] = time.monotonic() - t0
        if number > 1:
            self.spawned.set()
        try:
            make: Callable[[int], Outcome] = self.release[number].get()
            return make(number)
        finally:
            self.cleaned_up.append(number)


def policy(**kwargs: Any) -> HedgePolicy:
    """The contract's policy (``DELAY_S``, two hedges), with ``kwargs`` changed."""
    kwargs.setdefault("delay_s", DELAY_S)
    kwargs.setdefault("fanout", 2)
    return HedgePolicy(**kwargs)


#: ``run``'s keywords that belong to the policy rather than to the call.
POLICY_FIELDS = {"delay_s", "fanout", "min_attempt_s", "permit", "held_by_worker"}


def run(script: Script, **kwargs: Any) -> gevent.Greenlet:
    rules = {k: kwargs.pop(k) for k in list(kwargs) if k in POLICY_FIELDS}
    params: dict[str, Any] = {"pool": Pool(10), "deadline_s": None, **kwargs}
    return gevent.spawn(hedge, script.attempt, policy(**rules), **params)


def result_of(runner: gevent.Greenlet) -> HedgeResult:
    value = runner.get(timeout=PROMPTLY_S * 5)
    assert isinstance(value, HedgeResult)
    return value


def test_a_first_attempt_that_succeeds_before_the_delay_is_the_only_one() -> None:
    script = Script()
    runner = run(script)
    script.release[1].set(ok)
    result = result_of(runner)
    assert result.winner is not None and result.winner.attempt == 1
    assert result.attempts_started == 1
    assert result.trigger is None
    assert set(script.started) == {1}


def test_hedges_fire_at_the_delay_when_attempt_one_is_slow() -> None:
    script = Script()
    runner = run(script)
    assert script.spawned.wait(timeout=DELAY_S + LATE_S + PROMPTLY_S)
    gevent.sleep(0)  # let the second hedge greenlet run too
    assert DELAY_S <= script.started[2] <= DELAY_S + LATE_S
    assert DELAY_S <= script.started[3] <= DELAY_S + LATE_S
    script.release[1].set(ok)
    result = result_of(runner)
    assert result.trigger == Trigger.DELAY
    assert result.attempts_started == 3
    assert result.winner is not None and result.winner.attempt == 1


def test_hedges_fire_immediately_when_the_first_attempt_fails() -> None:
    script = Script()
    runner = run(script, delay_s=30.0)
    script.release[1].set(failed)
    assert script.spawned.wait(timeout=PROMPTLY_S)
    script.release[2].set(ok)
    result = result_of(runner)
    assert result.trigger == Trigger.EARLY_FAILURE
    assert result.winner is not None and result.winner.attempt == 2


def test_the_first_success_of_any_attempt_wins_and_the_rest_are_killed() -> None:
    script = Script()
    runner = run(script)
    assert script.spawned.wait(timeout=DELAY_S + LATE_S + PROMPTLY_S)
    gevent.sleep(0)
    script.release[3].set(ok)
    result = result_of(runner)
    assert result.winner is not None and result.winner.attempt == 3
    kinds = {o.attempt: o.kind for o in result.outcomes}
    assert kinds == {1: Kind.CANCELLED, 2: Kind.CANCELLED, 3: Kind.SUCCESS}
    assert result.cancelled == 2
    # The killed attempts unwound (their finally blocks ran) before hedge returned.
    assert sorted(script.cleaned_up) == [1, 2, 3]


def test_a_failed_hedge_does_not_end_the_request_while_others_run() -> None:
    script = Script()
    runner = run(script)
    script.release[1].set(failed)
    assert script.spawned.wait(timeout=PROMPTLY_S)
    script.release[2].set(failed)
    gevent.sleep(0.05)
    assert not runner.ready()
    script.release[3].set(ok)
    assert result_of(runner).winner.attempt == 3  # type: ignore[union-attr]


def test_all_attempts_failing_is_reported_at_once_without_waiting_for_the_deadline() -> None:
    script = Script()
    runner = run(script, deadline_s=60.0)
    script.release[1].set(failed)
    assert script.spawned.wait(timeout=PROMPTLY_S)
    script.release[2].set(failed)
    script.release[3].set(failed)
    with pytest.raises(AllAttemptsFailed) as caught:
        runner.get(timeout=PROMPTLY_S)
    assert [o.kind for o in caught.value.result.outcomes] == [Kind.HTTP_STATUS] * 3
    assert caught.value.result.winner is None


def test_the_deadline_ends_the_request_and_kills_every_attempt() -> None:
    script = Script()
    started = time.monotonic()
    runner = run(script, deadline_s=DELAY_S * 2)
    with pytest.raises(DeadlineExceeded) as caught:
        runner.get(timeout=DELAY_S * 2 + PROMPTLY_S)
    took = time.monotonic() - started
    assert DELAY_S * 2 <= took <= DELAY_S * 2 + LATE_S
    result = caught.value.result
    assert [o.kind for o in result.outcomes] == [Kind.CANCELLED] * 3
    assert sorted(script.cleaned_up) == [1, 2, 3]


def test_a_deadline_before_the_delay_means_no_hedges_unless_attempt_one_fails() -> None:
    script = Script()
    runner = run(script, deadline_s=DELAY_S / 2)
    with pytest.raises(DeadlineExceeded) as caught:
        runner.get(timeout=DELAY_S + PROMPTLY_S)
    assert caught.value.result.attempts_started == 1

    script = Script()
    runner = run(script, deadline_s=DELAY_S / 2)
    script.release[1].set(failed)
    assert script.spawned.wait(timeout=PROMPTLY_S)
    script.release[2].set(ok)
    assert result_of(runner).trigger == Trigger.EARLY_FAILURE


def test_fanout_zero_never_hedges() -> None:
    script = Script()
    runner = run(script, fanout=0, delay_s=0.0)
    script.release[1].set(failed)
    with pytest.raises(AllAttemptsFailed) as caught:
        runner.get(timeout=PROMPTLY_S)
    assert caught.value.result.attempts_started == 1


def test_a_permit_limits_the_hedges_and_the_refused_ones_are_counted() -> None:
    script = Script()
    asked: list[int] = []

    def permit(wanted: int) -> int:
        asked.append(wanted)
        return 1

    runner = run(script, permit=permit)
    script.release[1].set(failed)
    assert script.spawned.wait(timeout=PROMPTLY_S)
    script.release[2].set(failed)
    with pytest.raises(AllAttemptsFailed) as caught:
        runner.get(timeout=PROMPTLY_S)
    assert asked == [2]
    assert caught.value.result.attempts_started == 2
    assert caught.value.result.hedges_suppressed == 1


def test_an_attempt_that_raises_becomes_an_error_outcome() -> None:
    def broken(number: int, t0: float) -> Outcome:
        raise RuntimeError("bug")

    with pytest.raises(AllAttemptsFailed) as caught:
        hedge(broken, policy(), pool=Pool(10), deadline_s=None)
    assert [o.kind for o in caught.value.result.outcomes] == [Kind.ERROR] * 3


def test_killing_one_requests_leftovers_leaves_other_requests_attempts_alone() -> None:
    shared = Pool(10)
    slow, fast = Script(), Script()
    slow_runner = run(slow, pool=shared)
    fast_runner = run(fast, pool=shared)
    fast.release[1].set(ok)
    result_of(fast_runner)
    gevent.sleep(0)
    assert not slow_runner.ready()
    assert 1 not in slow.cleaned_up
    slow.release[1].set(ok)
    assert result_of(slow_runner).winner.attempt == 1  # type: ignore[union-attr]
    assert len(shared) == 0


def test_a_foreign_timeout_is_not_mistaken_for_the_deadline() -> None:
    script = Script()
    with pytest.raises(gevent.Timeout), gevent.Timeout(DELAY_S / 2):
        hedge(script.attempt, policy(), pool=Pool(10), deadline_s=60)
    assert script.cleaned_up == [1]


class LateHedges:
    """A pool whose hedges would run only in a minute: the request is decided first."""

    def __init__(self) -> None:
        self.hedges_spawned = Event()

    def spawn(self, func: Callable[..., Outcome], *args: object) -> gevent.Greenlet:
        if args[0] == 1:
            return gevent.spawn(func, *args)
        self.hedges_spawned.set()
        return gevent.spawn_later(60, func, *args)


def test_hedges_killed_before_they_ran_are_marked_as_never_sent() -> None:
    script = Script()
    pool = LateHedges()
    runner = run(script, pool=pool)
    assert pool.hedges_spawned.wait(timeout=DELAY_S + LATE_S + PROMPTLY_S)
    script.release[1].set(ok)
    result = result_of(runner)
    assert {o.attempt: (o.kind, o.sent) for o in result.outcomes} == {
        1: (Kind.SUCCESS, True),
        2: (Kind.CANCELLED, False),
        3: (Kind.CANCELLED, False),
    }
    assert set(script.started) == {1}


def test_attempts_killed_while_running_count_as_sent() -> None:
    script = Script()
    runner = run(script, deadline_s=DELAY_S / 2)
    with pytest.raises(DeadlineExceeded) as caught:
        runner.get(timeout=DELAY_S + PROMPTLY_S)
    assert [(o.kind, o.sent) for o in caught.value.result.outcomes] == [(Kind.CANCELLED, True)]


class Answers:
    """A fake ``answered``: attempt 1's answer is reported as waiting while ``waiting``."""

    def __init__(self) -> None:
        self.waiting = True
        self.asked = Event()

    def __call__(self, greenlet: gevent.Greenlet) -> bool:
        self.asked.set()
        return self.waiting


def test_no_hedge_while_attempt_ones_answer_waits_to_be_read() -> None:
    script = Script()
    answers = Answers()
    runner = run(script, held_by_worker=answers)
    assert answers.asked.wait(timeout=DELAY_S + LATE_S + PROMPTLY_S)
    gevent.sleep(DELAY_S)  # a worker that takes a whole extra delay to read it
    assert set(script.started) == {1}
    script.release[1].set(ok)
    result = result_of(runner)
    assert result.attempts_started == 1
    assert result.trigger is None


def test_the_hedges_fire_once_attempt_one_waits_on_the_upstream_again() -> None:
    script = Script()
    answers = Answers()
    runner = run(script, held_by_worker=answers)
    assert answers.asked.wait(timeout=DELAY_S + LATE_S + PROMPTLY_S)
    answers.waiting = False  # e.g. the headers were read, the body trickles
    assert script.spawned.wait(timeout=PROMPTLY_S)
    script.release[2].set(ok)
    assert result_of(runner).trigger == Trigger.DELAY


def test_a_failed_attempt_one_still_hedges_at_once_while_answers_wait() -> None:
    script = Script()
    runner = run(script, held_by_worker=Answers(), delay_s=30.0)
    script.release[1].set(failed)
    assert script.spawned.wait(timeout=PROMPTLY_S)
    script.release[2].set(ok)
    assert result_of(runner).trigger == Trigger.EARLY_FAILURE


def test_the_deadline_still_ends_a_request_whose_answer_is_never_read() -> None:
    script = Script()
    runner = run(script, held_by_worker=Answers(), deadline_s=DELAY_S * 2)
    with pytest.raises(DeadlineExceeded) as caught:
        runner.get(timeout=DELAY_S * 2 + PROMPTLY_S)
    assert caught.value.result.attempts_started == 1


class LateFirstAttempt:
    """A pool that runs attempt 1 only after ``lag_s``, as a busy worker would."""

    def __init__(self, lag_s: float) -> None:
        self.lag_s = lag_s

    def spawn(self, func: Callable[..., Outcome], *args: object) -> gevent.Greenlet:
        if args[0] == 1:
            return gevent.spawn_later(self.lag_s, func, *args)
        return gevent.spawn(func, *args)


def test_the_hedge_delay_counts_from_when_attempt_one_ran() -> None:
    script = Script()
    lag_s = DELAY_S / 2
    runner = run(script, pool=LateFirstAttempt(lag_s))
    assert script.spawned.wait(timeout=lag_s + DELAY_S + LATE_S + PROMPTLY_S)
    gevent.sleep(0)
    assert lag_s <= script.started[1] <= lag_s + LATE_S
    assert script.started[1] + DELAY_S <= script.started[2] <= script.started[1] + DELAY_S + LATE_S
    script.release[1].set(ok)
    assert result_of(runner).trigger == Trigger.DELAY
