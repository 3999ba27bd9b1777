"""Self-protection of one worker: the in-flight cap, its controller and the hedge budget.

All plain counters: a worker's greenlets share one thread, so no locks.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable


class InFlightLimiter:
    """Admits at most ``limit`` requests at once; refusing costs one comparison.

    ``limit`` may be moved while requests are in flight (``LagController``); ``peak``
    and ``refused`` are what the controller reads of the traffic since it last looked.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self.refused = 0

    def try_acquire(self) -> bool:
        n = self.in_flight
        if n >= self.limit:
            self.refused += 1
            return False
        n += 1
        self.in_flight = n
        self.peak = max(self.peak, n)
        return True

    def release(self) -> None:
        self.in_flight -= 1

    def full(self) -> bool:
        """Whether the next request would be refused."""
        return self.in_flight >= self.limit


class LagController:
    """Keeps the in-flight limit where this worker's event loop keeps up with its work.

    The signal is the loop's *lag*, how late a timer fires: it is the wait every step
    of every admitted request sees (reading its upstream answer, writing its response)
    and it is near zero until the worker's core is saturated, whatever the upstream's
    latency. A slow upstream means more requests in flight at no lag; a saturated core
    means lag at any count. So the limit follows the core, not the upstream, the way
    TCP's window follows the path: additive-increase, multiplicative-decrease over
    windows of ``window_s``.

    A window is judged by its median lag: single late wake-ups (the kernel giving the
    core to another process, a garbage collection) come and go whatever the load and
    are no reason to refuse; a saturated loop is late on every turn.

    - The median lag of a window above ``target_s``: the limit drops to ``DECREASE`` of
      the most requests that were in flight in it (not of the limit, which may stand
      far above what was used), never below ``floor``. While more requests than the
      new limit still run, it holds: their lag is the old limit's, not the new one's.
    - Below half the target and requests were refused: the limit was what bound, and
      it grows by ``INCREASE`` of itself (at least 1), never above ``ceiling``.
    - Otherwise it stays.
    """

    DECREASE = 0.9
    INCREASE = 0.1

    def __init__(
        self,
        limiter: InFlightLimiter,
        floor: int,
        target_s: float,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.ceiling = limiter.limit
        self.floor = min(floor, self.ceiling)
        self.target_s = target_s
        self.window_s = window_s
        self._clock = clock
        self._window_end = clock() + window_s
        self._lags: list[float] = []

    def observe(self, lag_s: float) -> None:
        """One lag sample; at the end of a window the limit is decided."""
        lags = self._lags
        lags.append(lag_s)
        now = self._clock()
        if now < self._window_end:
            return
        self._window_end = now + self.window_s
        lags.sort()
        self._decide(lags[len(lags) // 2])
        lags.clear()

    def _decide(self, lag_s: float) -> None:
        limiter = self.limiter
        used, refused = max(limiter.peak, limiter.in_flight), limiter.refused
        limiter.peak, limiter.refused = limiter.in_flight, 0
        limit = limiter.limit
        if lag_s > self.target_s:
            limit = max(self.floor, min(limit, int(used * self.DECREASE)))
        elif refused and lag_s < self.target_s / 2:
            limit = min(self.ceiling, limit + max(1, int(limit * self.INCREASE)))
        limiter.limit = limit


class HedgeBudget:
    """Caps hedged attempts at ``ratio`` of first attempts over a sliding window.

    In the style of Finagle's retry budget: every first attempt deposits ``ratio``,
    every hedged attempt withdraws one, and ``min_per_s`` is always available so a
    quiet worker can still hedge. Counts live in one-second buckets.
    """

    def __init__(
        self,
        ratio: float,
        window_s: int,
        min_per_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.reserve = min_per_s * window_s
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, firsts, hedges]
        self._firsts = 0
        self._hedges = 0

    def record_first(self) -> None:
        self._bucket()[1] += 1
        self._firsts += 1

    def permit(self, wanted: int) -> int:
        """How many of ``wanted`` hedged attempts may start now; those are recorded."""
        bucket = self._bucket()
        available = math.floor(self.ratio * self._firsts + self.reserve) - self._hedges
        granted = max(0, min(wanted, available))
        bucket[2] += granted
        self._hedges += granted
        return granted

    def _bucket(self) -> list[int]:
        second = int(self._clock())
        buckets = self._buckets
        while buckets and buckets[0][0] <= second - self.window_s:
            _, firsts, hedges = buckets.popleft()
            self._firsts -= firsts
            self._hedges -= hedges
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
        return buckets[-1]
