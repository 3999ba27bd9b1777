"""The yardstick: latencies a zero-overhead hedger would have, by Monte Carlo.

Same rules as smart (attempt 1 at 0; ``fanout`` hedges at the hedge delay or the
moment attempt 1 fails; the first success wins; every attempt bounded by the attempt
limit) over the simulator's random-mode draws: latency uniform in [min, max] for
successes and failures alike, except a ``hang``, which never answers and so ends at
the attempt limit. Nothing here costs any time, so measured minus ideal is overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Draws per estimate: the p99.9 of a million samples moves by well under 1 ms.
SAMPLES = 1_000_000
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True)
class Upstream:
    """The simulator's random mode, as the benchmark configures it."""

    min_ms: float = 100.0
    max_ms: float = 600.0
    failure_rate: float = 0.2
    #: Share of failures that are hangs: the default mix has one ``hang`` in 8 kinds.
    hang_share: float = 1 / 8


@dataclass(frozen=True)
class Policy:
    hedge_delay_ms: float = 300.0
    fanout: int = 2
    attempt_timeout_ms: float = 3000.0


@dataclass(frozen=True)
class Ideal:
    latency_ms: np.ndarray  # every request's answer time, sorted
    ok: np.ndarray  # whether the request succeeded, in the same order
    calls_per_request: float

    @property
    def error_rate(self) -> float:
        return float(1.0 - self.ok.mean())

    def percentile(self, p: float) -> float:
        return float(np.percentile(self.latency_ms, p))

    def summary(self) -> dict[str, float]:
        out = {f"p{p:g}": round(self.percentile(p), 1) for p in PERCENTILES}
        out["error_rate"] = round(self.error_rate, 5)
        out["calls_per_request"] = round(self.calls_per_request, 4)
        return out


def _attempts(rng: np.random.Generator, up: Upstream, policy: Policy, n: int, k: int):
    """``k`` independent attempts per request: (duration in ms, succeeded)."""
    latency = rng.uniform(up.min_ms, up.max_ms, size=(n, k))
    failed = rng.random((n, k)) < up.failure_rate
    hung = failed & (rng.random((n, k)) < up.hang_share)
    latency = np.where(hung, policy.attempt_timeout_ms, latency)
    return np.minimum(latency, policy.attempt_timeout_ms), ~failed


def hedged(
    up: Upstream = Upstream(),
    policy: Policy = Policy(),
    n: int = SAMPLES,
    seed: int = 1,
) -> Ideal:
    """The distribution a zero-overhead hedger would produce against ``up``."""
    rng = np.random.default_rng(seed)
    duration, success = _attempts(rng, up, policy, n, 1 + policy.fanout)
    delay = policy.hedge_delay_ms
    first, first_ok = duration[:, 0], success[:, 0]
    # Hedges start at the delay, or earlier if attempt 1 fails before it.
    hedge_at = np.where(~first_ok & (first < delay), first, delay)
    won_early = first_ok & (first < delay)
    start = np.zeros_like(duration)
    start[:, 1:] = hedge_at[:, None]
    end = start + duration
    # Attempts that never start (attempt 1 won in time) cannot win or fail.
    started = np.ones_like(success)
    started[:, 1:] = ~won_early[:, None]
    win_end = np.where(success & started, end, np.inf).min(axis=1)
    ok = np.isfinite(win_end)
    # No success: the answer goes out when the last started attempt has ended.
    fail_end = np.where(started, end, 0.0).max(axis=1)
    latency = np.where(ok, win_end, fail_end)
    calls = 1 + policy.fanout * (1 - won_early.mean())
    order = np.argsort(latency)
    return Ideal(latency[order], ok[order], float(calls))


def fixed(fixed_ms: float = 100.0, n: int = 10_000) -> Ideal:
    """Fixed mode: every attempt succeeds after exactly ``fixed_ms``: one call, no hedge."""
    return Ideal(np.full(n, fixed_ms), np.ones(n, dtype=bool), 1.0)


if __name__ == "__main__":
    import json

    summaries = {
        "hedged": hedged().summary(),
        "unhedged": hedged(policy=Policy(fanout=0)).summary(),
    }
    print(json.dumps(summaries, indent=2))
