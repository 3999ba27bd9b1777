"""The hedging algorithm on gevent primitives: who starts when, who wins, who is killed.

It knows attempts only as a callable returning an ``Outcome``; it imports no Flask,
no requests and records no metrics (the caller does, from the ``HedgeResult``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
from gevent import Greenlet
from gevent.event import Event

from smart.hedging.outcome import Kind, Outcome

#: How long the kill of one request's leftover attempts may take. A killed attempt
#: only has to unwind out of a socket call and close it; if it has not died by then it
#: is left to die alone rather than hold up the response.
KILL_GRACE_S = 1.0

#: ``attempt(number, t0)``: run attempt ``number`` (1-based) of a request that began
#: at ``t0`` (``time.monotonic``) and return how it ended. It must not raise.
Attempt = Callable[[int, float], Outcome]

#: ``permit(wanted)``: how many of ``wanted`` hedges may start now (a budget).
Permit = Callable[[int], int]

#: ``held_by_worker(greenlet)``: whether the attempt running in ``greenlet`` is held up
#: by this worker rather than the upstream: its connection is established or its answer
#: has arrived, and the worker has not yet got round to it.
HeldByWorker = Callable[[Greenlet], bool]

#: How often the hedger looks again while the hedge delay is being spent by this
#: worker rather than by the upstream (attempt 1 not yet running, or held by the
#: worker). Short next to the delay; each look is one poll(2) on a socket.
RECHECK_S = 0.01


class Spawner(Protocol):
    def spawn(self, func: Callable[..., Any], *args: Any) -> Greenlet: ...


class Trigger:
    """Why the hedges started."""

    DELAY = "delay"  # attempt 1 had not succeeded within the hedge delay
    EARLY_FAILURE = "early_failure"  # attempt 1 failed before the hedge delay


@dataclass(frozen=True, slots=True)
class HedgeResult:
    """Everything one hedged request did, for the response, the log and the metrics."""

    winner: Outcome | None
    outcomes: tuple[Outcome, ...]  # every started attempt, by attempt number
    trigger: str | None  # a Trigger value, or None when no hedge started
    hedges_suppressed: int  # hedges the permit refused
    elapsed_s: float
    hedges_too_late: int = 0  # hedges not started: too little time left to succeed

    @property
    def attempts_started(self) -> int:
        return len(self.outcomes)

    @property
    def cancelled(self) -> int:
        return sum(1 for o in self.outcomes if o.kind is Kind.CANCELLED)


class HedgeError(Exception):
    """No attempt succeeded; ``result`` says what each one did."""

    def __init__(self, result: HedgeResult) -> None:
        super().__init__(result)
        self.result = result


class DeadlineExceeded(HedgeError):
    """The request's deadline passed before any attempt succeeded."""


class AllAttemptsFailed(HedgeError):
    """Every attempt that could be started has failed."""


class Cancelled(HedgeError):
    """The caller gave up on the request (its client left) before it was decided."""


class _CancelSet(Exception):
    """Raised inside ``_Run`` when the ``cancel`` event is set."""


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    """When the hedges start, how many, and what may hold them back.

    Built once per worker from the settings, like urllib3's ``Timeout`` and ``Retry``
    values, and passed to every ``hedge`` call; what varies per request (the attempt,
    its deadline, its start) is passed beside it.
    """

    delay_s: float  # the hedge delay
    fanout: int  # hedges started at once; 0 turns hedging off
    #: Start no attempt with less than this left before the deadline.
    min_attempt_s: float = 0.0
    #: A hedge budget: how many of the wanted hedges may start; None: all of them.
    permit: Permit | None = None
    #: Whether attempt 1 waits for this worker rather than the upstream (see ``hedge``).
    held_by_worker: HeldByWorker | None = None


def hedge(
    attempt: Attempt,
    policy: HedgePolicy,
    *,
    pool: Spawner,
    deadline_s: float | None,
    t0: float | None = None,
    cancel: Event | None = None,
) -> HedgeResult:
    """Run attempt 1 now and ``policy.fanout`` more at the hedge delay or at its failure.

    Returns as soon as one attempt succeeds; raises ``AllAttemptsFailed`` the moment
    no attempt is left running and none is left to start, and ``DeadlineExceeded``
    when ``deadline_s`` (seconds after ``t0``) passes first. Either way every attempt
    still running is killed, and its socket closed, before this returns.

    No attempt starts with less than ``policy.min_attempt_s`` left before the deadline: it
    could not succeed in time. When that rules out attempt 1, ``DeadlineExceeded`` is
    raised at once; when it rules out the hedges, they count as ``hedges_too_late``.

    The hedge delay measures the upstream, not this worker: it runs from the moment
    attempt 1 actually started, and when it is over while attempt 1 is held up by this
    worker (``policy.held_by_worker``: say, its answer has arrived unread), the hedges wait
    for the worker to catch up. A busy worker reads answers late; hedging them would
    multiply its load for nothing.

    When ``cancel`` is set before the request is decided, the attempts are killed at
    once and ``Cancelled`` is raised.
    """
    start = time.monotonic() if t0 is None else t0
    run = _Run(attempt, pool, start, deadline_s, policy.min_attempt_s)
    deadline = gevent.Timeout(None if deadline_s is None else max(0.0, deadline_s - run.now()))
    failure: type[HedgeError] | None = None
    winner: Outcome | None = None
    try:
        deadline.start()
        if run.too_late():
            failure = DeadlineExceeded
        else:
            winner = run.until_decided(policy, cancel)
            if winner is None:
                failure = AllAttemptsFailed
    except _CancelSet:
        failure = Cancelled
    except gevent.Timeout as expired:
        if expired is not deadline:
            raise
        failure = DeadlineExceeded
    finally:
        deadline.close()
        run.cancel_leftovers()
    result = HedgeResult(
        winner=winner,
        outcomes=tuple(sorted(run.outcomes, key=lambda o: o.attempt)),
        trigger=run.trigger,
        hedges_suppressed=run.suppressed,
        elapsed_s=run.now(),
        hedges_too_late=run.too_late_hedges,
    )
    if failure is not None:
        raise failure(result)
    return result


class _Run:
    """The mutable state of one ``hedge`` call."""

    def __init__(
        self,
        attempt: Attempt,
        pool: Spawner,
        t0: float,
        deadline_s: float | None = None,
        min_attempt_s: float = 0.0,
    ) -> None:
        self.attempt = attempt
        self.pool = pool
        self.t0 = t0
        self.deadline_s = deadline_s
        self.min_attempt_s = min_attempt_s
        self.too_late_hedges = 0
        self.running: dict[Greenlet, tuple[int, float]] = {}  # greenlet -> (number, start)
        self.ran: dict[int, float] = {}  # attempts whose greenlet got to run -> when
        self.outcomes: list[Outcome] = []
        self.trigger: str | None = None
        self.suppressed = 0
        self.started = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def too_late(self) -> bool:
        """True when an attempt started now could not answer before the deadline."""
        return self.deadline_s is not None and self.deadline_s - self.now() < self.min_attempt_s

    def start(self, count: int) -> None:
        for _ in range(count):
            self.started += 1
            greenlet = self.pool.spawn(self.run, self.started)
            self.running[greenlet] = (self.started, self.now())

    def until_hedge(
        self, first: Greenlet, delay_s: float, held_by_worker: HeldByWorker | None
    ) -> float:
        """Seconds until the hedges are due; 0.0 when they are due now.

        Time attempt 1 spent waiting for this worker does not count: before its
        greenlet ran, while it is ``held_by_worker``, and once it has finished but
        the wait has not yet been told.
        """
        began = self.ran.get(1)
        if began is None or first.dead:
            return RECHECK_S
        left = began + delay_s - self.now()
        if left > 0:
            return left
        if held_by_worker is not None and held_by_worker(first):
            return RECHECK_S
        return 0.0

    def run(self, number: int) -> Outcome:
        self.ran[number] = self.now()
        return self.attempt(number, self.t0)

    def until_decided(self, policy: HedgePolicy, cancel: Event | None = None) -> Outcome | None:
        """Wait for attempts until one succeeds (returned) or all failed (None);
        ``_CancelSet`` once ``cancel`` is set."""
        if cancel is not None and cancel.is_set():
            raise _CancelSet
        self.start(1)
        first = next(iter(self.running))
        hedged = policy.fanout == 0
        while self.running:
            timeout = None
            if not hedged:
                timeout = self.until_hedge(first, policy.delay_s, policy.held_by_worker)
                if timeout == 0.0:  # the upstream has had its delay: hedge
                    self.fire(Trigger.DELAY, policy)
                    hedged = True
                    timeout = None
            waited: list[Any] = list(self.running)
            if cancel is not None:
                waited.append(cancel)
            ready = gevent.wait(waited, timeout=timeout, count=1)
            if cancel is not None and cancel.is_set():
                raise _CancelSet
            if not ready:
                continue  # time to look at the hedge delay again
            outcome = self.finish(ready[0])
            if outcome.ok:
                return outcome
            if not hedged:
                # A failed attempt 1 cannot succeed any more; waiting out the delay
                # would only add latency (gRPC hedging does the same).
                self.fire(Trigger.EARLY_FAILURE, policy)
                hedged = True
        return None

    def fire(self, trigger: str, policy: HedgePolicy) -> None:
        fanout, permit = policy.fanout, policy.permit
        if self.too_late():
            self.too_late_hedges += fanout
            return
        allowed = fanout if permit is None else max(0, min(fanout, permit(fanout)))
        self.suppressed += fanout - allowed
        if allowed:
            self.trigger = trigger
            self.start(allowed)

    def finish(self, greenlet: Greenlet) -> Outcome:
        number, started = self.running.pop(greenlet)
        outcome = _outcome_of(greenlet, number, started, self.now(), number in self.ran)
        self.outcomes.append(outcome)
        return outcome

    def cancel_leftovers(self) -> None:
        leftovers = list(self.running)
        if not leftovers:
            return
        # Kill only this request's greenlets: the pool is shared by every request of
        # the worker. Bounded, because a kill is a request, not a guarantee.
        gevent.killall(leftovers, block=False)
        gevent.joinall(leftovers, timeout=KILL_GRACE_S)
        for greenlet in leftovers:
            self.finish(greenlet)


def _outcome_of(greenlet: Greenlet, number: int, started: float, now: float, ran: bool) -> Outcome:
    if greenlet.dead and greenlet.successful() and isinstance(greenlet.value, Outcome):
        return greenlet.value  # finished on its own, possibly just before the kill
    if greenlet.dead and greenlet.exception is not None:
        return Outcome(number, Kind.ERROR, started, now - started, detail=repr(greenlet.exception))
    # Killed before it ran (spawned in the same instant the request was decided): it
    # never reached the upstream, which the metrics must not count as a call.
    return Outcome(number, Kind.CANCELLED, started, now - started, sent=ran)
