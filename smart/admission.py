"""Self-protection of one worker: the in-flight cap and the hedge budget.

Both are plain counters: a worker's greenlets share one thread, so no locks.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable


class InFlightLimiter:
    """Admits at most ``limit`` requests at once; refusing costs one comparison."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


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
