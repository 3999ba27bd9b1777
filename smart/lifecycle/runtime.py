"""The per-worker runtime: everything a request needs that outlives one request.

Built by the app factory inside each worker (after the fork and after gevent's
patching) and kept in ``app.extensions["smart"]``; never a module global.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gevent
from gevent import Greenlet
from gevent.pool import Pool

from smart.config import Settings
from smart.hedging.hedge import HedgePolicy
from smart.observability.telemetry import Telemetry
from smart.protection import capacity, exhaustion
from smart.protection.admission import HedgeBudget, InFlightLimiter, LagController
from smart.upstream.client import UpstreamClient

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

#: How often idle upstream connections are checked for having been closed by the
#: upstream: the longest a dead one lingers in CLOSE_WAIT. A check costs one poll(2)
#: per idle connection.
IDLE_SWEEP_INTERVAL_S = 2.0
#: How often the event loop's lag is sampled: a timer this often costs ~0.1% of a core.
LAG_SAMPLE_INTERVAL_S = 0.01
#: How often the in-flight limit is decided, over the samples since the last time.
LAG_WINDOW_S = 0.1

log = logging.getLogger("smart")


@dataclass(slots=True)
class Runtime:
    settings: Settings  # with the capacity's figures in place of any ``auto``
    capacity: capacity.Capacity
    client: UpstreamClient
    pool: Pool  # every upstream attempt of this worker runs in it; its size is the cap
    limiter: InFlightLimiter
    budget: HedgeBudget | None
    telemetry: Telemetry
    hedge_policy: HedgePolicy  # the settings' hedging rules, with this worker's budget
    draining: bool = field(default=False)
    sweeper: Greenlet | None = field(default=None)
    lag_watch: Greenlet | None = field(default=None)
    unguard_accept: Callable[[], None] | None = field(default=None)

    @classmethod
    def build(cls, settings: Settings, tracer_provider: TracerProvider | None = None) -> Runtime:
        """``tracer_provider`` replaces the one the ``OTEL_*`` variables would configure.

        The in-flight ceiling and connection limit are decided here, from what the
        worker has (``capacity.measure``), unless both are set.
        """
        limits = capacity.measure(settings)
        settings = dataclasses.replace(
            settings,
            max_in_flight=limits.max_in_flight,
            worker_connections=limits.worker_connections,
        )
        budget = None
        if settings.hedge_budget_ratio > 0:
            budget = HedgeBudget(
                settings.hedge_budget_ratio,
                settings.hedge_budget_window_s,
                settings.hedge_budget_min_per_s,
            )
        telemetry = Telemetry.build(settings, tracer_provider)
        client = UpstreamClient(settings, on_reconnect=telemetry.reconnected)
        runtime = cls(
            settings=settings,
            capacity=limits,
            client=client,
            pool=Pool(settings.max_upstream_in_flight),
            limiter=InFlightLimiter(limits.max_in_flight),
            budget=budget,
            telemetry=telemetry,
            hedge_policy=HedgePolicy(
                delay_s=settings.hedge_delay_s,
                fanout=settings.hedge_fanout,
                min_attempt_s=settings.min_attempt_s,
                permit=None if budget is None else budget.permit,
                held_by_worker=client.held_by_worker,
            ),
        )
        runtime.sweeper = gevent.spawn(_housekeeping, runtime.client, runtime.telemetry)
        runtime.unguard_accept = exhaustion.guard_accept(
            gevent.get_hub(), runtime.telemetry.descriptors_exhausted
        )
        runtime.telemetry.capacity_decided(limits)
        runtime.telemetry.limit_changed(limits.max_in_flight)
        if settings.loop_lag_target_ms > 0:
            controller = LagController(
                runtime.limiter,
                settings.min_in_flight,
                settings.loop_lag_target_s,
                LAG_WINDOW_S,
                cpu_clock=time.process_time,
                busy_share=settings.loop_lag_busy_share,
            )
            runtime.lag_watch = gevent.spawn(_watch_lag, controller, runtime.telemetry)
        return runtime

    def close(self) -> None:
        for greenlet in (self.sweeper, self.lag_watch):
            if greenlet is not None:
                greenlet.kill(block=True, timeout=1)
        if self.unguard_accept is not None:
            self.unguard_accept()
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


def _watch_lag(controller: LagController, telemetry: Telemetry) -> None:
    """Every ``LAG_SAMPLE_INTERVAL_S``: how late the loop woke this greenlet, to the
    controller; the limit it sets, to the metrics."""
    clock, interval, limiter = time.monotonic, LAG_SAMPLE_INTERVAL_S, controller.limiter
    limit = limiter.limit
    while True:
        before = clock()
        gevent.sleep(interval)
        controller.observe(max(0.0, clock() - before - interval))
        if limiter.limit != limit:
            limit = limiter.limit
            telemetry.limit_changed(limit)
