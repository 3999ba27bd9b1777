"""The per-worker runtime: everything a request needs that outlives one request.

Built by the app factory inside each worker (after the fork and after gevent's
patching) and kept in ``app.extensions["smart"]``; never a module global.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gevent
from gevent import Greenlet
from gevent.pool import Pool

from smart.admission import HedgeBudget, InFlightLimiter
from smart.config import Settings
from smart.telemetry import Telemetry
from smart.upstream import UpstreamClient

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

#: How often idle upstream connections are checked for having been closed by the
#: upstream: the longest a dead one lingers in CLOSE_WAIT. A check costs one poll(2)
#: per idle connection.
IDLE_SWEEP_INTERVAL_S = 2.0

log = logging.getLogger("smart")


@dataclass(slots=True)
class Runtime:
    settings: Settings
    client: UpstreamClient
    pool: Pool  # every upstream attempt of this worker runs in it; its size is the cap
    limiter: InFlightLimiter
    budget: HedgeBudget | None
    telemetry: Telemetry
    draining: bool = field(default=False)
    sweeper: Greenlet | None = field(default=None)

    @classmethod
    def build(cls, settings: Settings, tracer_provider: TracerProvider | None = None) -> Runtime:
        """``tracer_provider`` replaces the one the ``OTEL_*`` variables would configure."""
        budget = None
        if settings.hedge_budget_ratio > 0:
            budget = HedgeBudget(
                settings.hedge_budget_ratio,
                settings.hedge_budget_window_s,
                settings.hedge_budget_min_per_s,
            )
        runtime = cls(
            settings=settings,
            client=UpstreamClient(settings),
            pool=Pool(settings.max_upstream_in_flight),
            limiter=InFlightLimiter(settings.max_in_flight),
            budget=budget,
            telemetry=Telemetry.build(settings, tracer_provider),
        )
        runtime.sweeper = gevent.spawn(_housekeeping, runtime.client, runtime.telemetry)
        return runtime

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.kill(block=True, timeout=1)
        self.pool.kill(block=True, timeout=1)
        self.client.close()
        self.telemetry.close()


def _housekeeping(client: UpstreamClient, telemetry: Telemetry) -> None:
    """Every ``IDLE_SWEEP_INTERVAL_S``: sweep idle connections, write owed log lines."""
    while True:
        gevent.sleep(IDLE_SWEEP_INTERVAL_S)
        try:
            client.close_dropped_idle()
            telemetry.tick()
        except Exception:  # a bug here must not end the housekeeping
            log.exception("worker housekeeping failed")
