"""Self-protection without sockets: the in-flight cap, the hedge budget, and the rule
that no attempt starts without time left to succeed.

The budget runs on a fake clock; the hedger on fake attempts. Only the deadline rule
reads real time, with margins far wider than any scheduling stall.
"""

from __future__ import annotations

import itertools
import runpy
import time
from collections.abc import Callable, Iterator

import gevent
import pytest
from flask.testing import FlaskClient
from gevent.pool import Pool

from smart.app import create_app
from smart.config import Settings
from smart.hedging.hedge import AllAttemptsFailed, DeadlineExceeded, HedgePolicy, HedgeResult, hedge
from smart.hedging.outcome import Kind, Outcome
from smart.lifecycle.runtime import Runtime
from smart.protection.admission import HedgeBudget, InFlightLimiter, LagController
from tests.support import ROOT, wait_until

#: A bound on waiting for something that should happen at once.
PROMPTLY_S = 1.0
GUNICORN_CONF = ROOT / "gunicorn.conf.py"


# --- the in-flight cap ---------------------------------------------------------------


def test_the_limiter_admits_up_to_its_limit_and_refuses_the_next() -> None:
    limiter = InFlightLimiter(3)
    assert [limiter.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert limiter.in_flight == 3


def test_a_released_slot_is_admitted_again() -> None:
    limiter = InFlightLimiter(1)
    assert limiter.try_acquire()
    assert not limiter.try_acquire()
    limiter.release()
    assert limiter.try_acquire()
    assert limiter.in_flight == 1


@pytest.fixture
def full_app() -> Iterator[tuple[FlaskClient, Runtime]]:
    app = create_app(
        Settings(upstream_url="http://127.0.0.1:9/api/work", max_in_flight=2, log_requests=False)
    )
    runtime: Runtime = app.extensions["smart"]
    while runtime.limiter.try_acquire():
        pass
    yield app.test_client(), runtime
    runtime.close()


def test_a_full_worker_answers_503_with_retry_after_without_calling_upstream(
    full_app: tuple[FlaskClient, Runtime],
) -> None:
    client, runtime = full_app
    response = client.get("/api/smart?timeout=1000")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json["error"] == "overloaded"
    assert set(response.json) == {"error", "message", "request_id", "attempts"}
    assert len(runtime.pool) == 0
    assert runtime.limiter.in_flight == runtime.limiter.limit


def test_a_refusal_never_reaches_flask(full_app: tuple[FlaskClient, Runtime]) -> None:
    # Its cost is measured by `python bench/overload.py refusal`; here, that it skips
    # the app: no request context, no routing, no view.
    client, _ = full_app
    reached: list[str] = []
    client.application.before_request(lambda: reached.append("flask") and None)
    assert client.get("/api/smart").status_code == 503
    assert client.get("/healthz").status_code == 200
    assert reached == ["flask"]  # the probe's, not the refusal's


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_are_never_shed(full_app: tuple[FlaskClient, Runtime], path: str) -> None:
    client, _ = full_app
    assert client.get(path).status_code == 200


def test_the_attempt_pool_holds_every_attempt_the_admitted_requests_can_start() -> None:
    # Pool.spawn blocks when the pool is full: sized this way, an admitted request
    # never waits for a slot, and the cap on requests is the cap on upstream calls.
    settings = Settings(upstream_url="http://127.0.0.1:9/api/work", max_in_flight=7)
    runtime = Runtime.build(settings)
    try:
        assert runtime.pool.size == 7 * (1 + settings.hedge_fanout)
    finally:
        runtime.close()


@pytest.mark.parametrize("cap", ["4096", "5000"])
def test_gunicorn_will_not_start_with_the_cap_at_or_above_its_connection_limit(
    monkeypatch: pytest.MonkeyPatch, cap: str
) -> None:
    # Requests past the cap must reach the app to get their 503; past gunicorn's
    # worker_connections they wait unseen in the kernel's backlog instead.
    monkeypatch.setenv("SMART_WORKER_CONNECTIONS", "4096")
    monkeypatch.setenv("SMART_MAX_IN_FLIGHT", cap)
    with pytest.raises(SystemExit, match="SMART_MAX_IN_FLIGHT"):
        runpy.run_path(str(GUNICORN_CONF))


def test_a_connection_limit_alone_holds_the_auto_cap_below_it() -> None:
    settings = Settings(upstream_url="http://127.0.0.1:9/api/work", worker_connections=100)
    runtime = Runtime.build(settings)
    try:
        assert runtime.settings.max_in_flight is not None
        assert runtime.settings.max_in_flight < 100
    finally:
        runtime.close()


def test_a_worker_accepts_more_connections_than_it_admits_by_default() -> None:
    runtime = Runtime.build(Settings(upstream_url="http://127.0.0.1:9/api/work"))
    try:
        settings = runtime.settings
        assert settings.max_in_flight is not None and settings.worker_connections is not None
        assert settings.worker_connections > settings.max_in_flight
    finally:
        runtime.close()


# --- the in-flight limit follows the event loop's lag -----------------------------------

#: The controller under test: a target of 20 ms, decided every 100 ms of the fake clock.
TARGET_S, WINDOW_S = 0.020, 0.100


def controlled(limit: int, floor: int = 4) -> tuple[LagController, InFlightLimiter, FakeClock]:
    clock = FakeClock()
    limiter = InFlightLimiter(limit)
    return LagController(limiter, floor, TARGET_S, WINDOW_S, clock), limiter, clock


def one_window(controller: LagController, clock: FakeClock, lags: list[float]) -> None:
    """``lags`` as the samples of one window; the last one closes it."""
    for lag in lags:
        clock.now += WINDOW_S * 1.001 / len(lags)  # the last sample lands past the end
        controller.observe(lag)


def test_a_lagging_loop_cuts_the_limit_to_below_what_was_in_flight() -> None:
    controller, limiter, clock = controlled(256)
    for _ in range(50):
        limiter.try_acquire()
    one_window(controller, clock, [0.05] * 5)
    # 90% of the 50 in flight, not of the cap of 256 that nobody used.
    assert limiter.limit == 45
    for _ in range(5):
        limiter.release()
    # 50 ran in this window too, admitted before the cut: the lag is theirs.
    one_window(controller, clock, [0.05] * 5)
    assert limiter.limit == 45
    # A whole window at the new limit, and still lagging: the next cut.
    one_window(controller, clock, [0.05] * 5)
    assert limiter.limit == 40


def test_the_limit_never_falls_below_its_floor() -> None:
    controller, limiter, clock = controlled(64, floor=10)
    limiter.try_acquire()
    for _ in range(30):
        one_window(controller, clock, [0.5] * 3)
    assert limiter.limit == 10


def test_single_late_wakeups_do_not_lower_the_limit() -> None:
    controller, limiter, clock = controlled(64)
    for _ in range(64):
        limiter.try_acquire()
    # The kernel gave the core away once or twice: the median turn was on time.
    one_window(controller, clock, [0.001, 0.2, 0.001, 0.001, 0.09, 0.002, 0.001])
    assert limiter.limit == 64


def test_a_loop_that_keeps_up_raises_the_limit_only_while_requests_are_refused() -> None:
    controller, limiter, clock = controlled(64)
    one_window(controller, clock, [0.05] * 4)
    assert limiter.limit == 4  # nothing in flight: cut to the floor
    one_window(controller, clock, [0.001] * 4)
    assert limiter.limit == 4  # on time, but nobody was refused: no reason to grow
    grown = [limiter.limit]
    for _ in range(40):
        while limiter.try_acquire():
            pass  # fill it, and one more is refused
        one_window(controller, clock, [0.001] * 4)
        grown.append(limiter.limit)
        limiter.in_flight = 0
    assert grown[:5] == [4, 5, 6, 7, 8]  # at least one more a window
    assert grown[-1] == 64  # and back to the cap, never above it
    assert all(a <= b for a, b in itertools.pairwise(grown))


def test_a_lag_between_half_the_target_and_the_target_holds_the_limit() -> None:
    controller, limiter, clock = controlled(64)
    for _ in range(65):
        limiter.try_acquire()
    one_window(controller, clock, [TARGET_S * 0.75] * 4)
    assert limiter.limit == 64


def test_a_worker_whose_loop_is_kept_busy_lowers_its_limit_and_raises_it_when_free() -> None:
    """The real watcher greenlet on the real gevent loop: CPU-bound greenlets make the
    loop late, the limit falls; once they stop and requests are refused, it climbs back.
    """
    settings = Settings(
        upstream_url="http://127.0.0.1:9/api/work",
        max_in_flight=64,
        min_in_flight=4,
        loop_lag_target_ms=5,
        metrics=False,
        log_requests=False,
    )
    runtime = Runtime.build(settings)
    limiter = runtime.limiter
    try:
        for _ in range(32):
            limiter.try_acquire()
        busy = True

        def hog() -> None:
            while busy:
                end = time.monotonic() + 0.03  # each turn of the loop takes 30 ms
                while time.monotonic() < end:
                    pass
                gevent.sleep(0)

        hogs = [gevent.spawn(hog) for _ in range(2)]
        assert wait_until(lambda: limiter.limit < 32, LAG_REACTION_S)
        busy = False
        gevent.joinall(hogs, timeout=PROMPTLY_S)
        limiter.in_flight = 0

        def refused_and_grown() -> bool:
            while limiter.try_acquire():
                pass
            limiter.in_flight = 0
            return limiter.limit == 64

        assert wait_until(refused_and_grown, LAG_REACTION_S * 4)
    finally:
        runtime.close()


#: Generous bound on the controller reacting, many 100 ms windows on a loaded box.
LAG_REACTION_S = 10.0


# --- the hedge budget ----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(
    ratio: float, window_s: int = 10, min_per_s: float = 0.0
) -> tuple[HedgeBudget, FakeClock]:
    clock = FakeClock()
    return HedgeBudget(ratio, window_s, min_per_s, clock=clock), clock


def test_the_budget_grants_hedges_up_to_its_ratio_of_first_attempts() -> None:
    hedges, _ = budget(0.5)
    for _ in range(10):
        hedges.record_first()
    assert [hedges.permit(2) for _ in range(4)] == [2, 2, 1, 0]


def test_a_partial_grant_is_all_that_is_left() -> None:
    hedges, _ = budget(0.1)
    for _ in range(15):
        hedges.record_first()
    assert hedges.permit(2) == 1
    assert hedges.permit(2) == 0


def test_the_reserve_lets_a_quiet_worker_hedge_without_any_first_attempts() -> None:
    hedges, _ = budget(0.1, window_s=10, min_per_s=0.5)
    granted = [hedges.permit(2) for _ in range(4)]
    assert granted == [2, 2, 1, 0]  # 0.5/s over a 10 s window is 5 hedges


def test_hedges_and_first_attempts_leave_the_budget_when_they_leave_the_window() -> None:
    hedges, clock = budget(0.5, window_s=10)
    for _ in range(4):
        hedges.record_first()
    assert hedges.permit(2) == 2
    assert hedges.permit(2) == 0
    clock.now += 9.5
    assert hedges.permit(2) == 0  # the same window: spent
    clock.now += 1.0
    assert hedges.permit(2) == 0  # the deposits expired together with the withdrawals
    for _ in range(2):
        hedges.record_first()
    assert hedges.permit(2) == 1


def test_the_window_slides_second_by_second() -> None:
    hedges, clock = budget(1.0, window_s=3)
    hedges.record_first()
    hedges.record_first()
    assert hedges.permit(5) == 2  # second 0
    clock.now += 1
    hedges.record_first()
    assert hedges.permit(5) == 1  # second 1
    clock.now += 2  # second 3: second 0's first attempts and hedges have left together
    assert hedges.permit(5) == 0  # second 1's first attempt paid for second 1's hedge
    hedges.record_first()
    assert hedges.permit(5) == 1


# --- the hedger honours the budget and the time left ----------------------------------


def ok(number: int) -> Outcome:
    return Outcome(number, Kind.SUCCESS, 0.0, 0.0, status=200, body=b'{"time": 1}')


def failed(number: int) -> Outcome:
    return Outcome(number, Kind.HTTP_STATUS, 0.0, 0.0, status=503)


class Attempts:
    """Fake attempts: each returns what ``outcomes`` says, after ``delays`` seconds."""

    def __init__(
        self,
        outcomes: dict[int, Callable[[int], Outcome]],
        delays: dict[int, float] | None = None,
    ) -> None:
        self.outcomes = outcomes
        self.delays = delays or {}
        self.started: list[int] = []

    def __call__(self, number: int, t0: float) -> Outcome:
        self.started.append(number)
        gevent.sleep(self.delays.get(number, 0.0))
        return self.outcomes[number](number)


def test_hedges_the_budget_refuses_are_counted_as_suppressed() -> None:
    hedges, _ = budget(0.5)
    hedges.record_first()
    hedges.record_first()  # 1 hedge in the budget
    attempts = Attempts({1: failed, 2: failed})
    with pytest.raises(AllAttemptsFailed) as caught:
        hedge(
            attempts,
            HedgePolicy(delay_s=30.0, fanout=2, permit=hedges.permit),
            pool=Pool(10),
            deadline_s=None,
        )
    result = caught.value.result
    assert attempts.started == [1, 2]
    assert result.hedges_suppressed == 1


def test_a_timeout_too_short_for_any_attempt_is_answered_at_once_without_one() -> None:
    attempts = Attempts({1: ok})
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        hedge(
            attempts,
            HedgePolicy(delay_s=0.3, fanout=2, min_attempt_s=0.005),
            pool=Pool(10),
            deadline_s=0.004,
        )
    assert time.monotonic() - started < PROMPTLY_S
    assert attempts.started == []
    assert caught.value.result.outcomes == ()


def test_a_timeout_as_long_as_the_shortest_attempt_still_gets_its_attempt() -> None:
    result = hedge(
        Attempts({1: ok}),
        HedgePolicy(delay_s=0.3, fanout=2, min_attempt_s=5.0 - PROMPTLY_S),
        pool=Pool(10),
        deadline_s=5.0,
    )
    assert isinstance(result, HedgeResult) and result.winner is not None


#: The deadline rule's cases below: a deadline with room for two "shortest attempts"
#: at the start and less than one by the time attempt 1 fails late. The margins are
#: hundreds of ms, so a scheduling stall cannot move a case across the line.
DEADLINE_S = 0.6
MIN_ATTEMPT_S = 0.3
LATE_FAILURE_S = 0.35


def test_hedges_after_an_early_failure_start_when_time_is_left() -> None:
    attempts = Attempts({1: failed, 2: ok, 3: ok})
    result = hedge(
        attempts,
        HedgePolicy(delay_s=30.0, fanout=2, min_attempt_s=MIN_ATTEMPT_S),
        pool=Pool(10),
        deadline_s=DEADLINE_S,
    )
    assert sorted(attempts.started) == [1, 2, 3]
    assert result.hedges_too_late == 0


def test_hedges_too_late_to_succeed_are_not_started_and_the_failure_is_answered_at_once() -> None:
    attempts = Attempts({1: failed}, delays={1: LATE_FAILURE_S})
    with pytest.raises(AllAttemptsFailed) as caught:
        hedge(
            attempts,
            HedgePolicy(delay_s=30.0, fanout=2, min_attempt_s=MIN_ATTEMPT_S),
            pool=Pool(10),
            deadline_s=DEADLINE_S,
        )
    result = caught.value.result
    assert attempts.started == [1]
    assert result.hedges_too_late == 2
    assert result.elapsed_s < DEADLINE_S  # not a wait for the deadline


def test_hedges_due_at_the_delay_with_too_little_time_left_leave_attempt_one_running() -> None:
    # At the delay (0.3 s) 0.7 s are left, less than the shortest attempt (0.8 s);
    # attempt 1 answers 0.4 s after the delay, far beyond any stall.
    attempts = Attempts({1: ok}, delays={1: 0.7})
    result = hedge(
        attempts,
        HedgePolicy(delay_s=0.3, fanout=2, min_attempt_s=0.8),
        pool=Pool(10),
        deadline_s=1.0,
    )
    assert attempts.started == [1]
    assert result.hedges_too_late == 2
    assert result.trigger is None
    assert result.winner is not None and result.winner.attempt == 1
