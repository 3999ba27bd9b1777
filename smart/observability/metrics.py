"""Every Prometheus metric of smart, declared once, and the ``/metrics`` exposition.

Under gunicorn the values live in ``PROMETHEUS_MULTIPROC_DIR`` (one file per worker
and metric type) and every scrape merges all workers' files. Without it (an app built
in-process, e.g. by tests) each app gets its own registry: no module-level metric
objects, so building two apps in one process never clashes.
"""

from __future__ import annotations

import logging
import os
from typing import Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

from smart.hedging.outcome import Kind

log = logging.getLogger("smart")

#: Client-visible latency. The upstream takes ~100-600 ms, hedges start at 300 ms and
#: clients may wait up to 60 s: fine steps from 100 ms to 1 s, coarse ones around.
REQUEST_BUCKETS_S = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
    30.0, 60.0,
)  # fmt: skip
#: One attempt's latency. Failures come back in a few ms, answers take 100-600 ms and
#: an attempt without a client timeout is cut at SMART_ATTEMPT_TIMEOUT_MS (3 s).
ATTEMPT_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    10.0,
)  # fmt: skip
#: Share of the client's ``timeout`` a request used; above 0.9 it is close to a 504.
TIMEOUT_USED_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)

#: The bounded values of ``outcome`` on attempt metrics (``Outcome.group``).
ATTEMPT_OUTCOMES = (
    "success", "http_5xx", "http_4xx", "http_other",
    *(k.value for k in Kind if k not in (Kind.SUCCESS, Kind.HTTP_STATUS)),
)  # fmt: skip
#: Every (status, outcome) an /api/smart response can have; created at zero so rates
#: and ratios exist before the first failure.
REQUEST_OUTCOMES = (
    ("200", "success"),
    ("400", "invalid_timeout"),
    ("499", "client_closed"),
    ("500", "internal_error"),
    ("502", "upstream_failed"),
    ("503", "overloaded"),
    ("504", "upstream_timeout"),
)
HEDGE_TRIGGERS = ("delay", "early_failure")

M = TypeVar("M", Counter, Histogram)


class Labelled(Generic[M]):
    """A labelled metric whose children are kept in a dict, looked up by label values.

    prometheus_client's ``labels()`` validates its arguments and takes a lock on every
    call (about 4 us here); a dict hit costs a few percent of that. The values used are
    bounded sets (status codes, outcome groups, attempt numbers), so is the dict.
    """

    __slots__ = ("_children", "metric")

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """The metrics of one app. ``registry`` is None in multiprocess mode."""

    def __init__(self, registry: CollectorRegistry | None, attempts_per_request: int) -> None:
        self.registry = registry
        #: For the start-up log: whose samples /metrics shows.
        self.mode = "this app only" if registry is not None else "all workers"
        r = registry
        self.requests = Labelled(
            Counter(
                "smart_requests",
                "Responses of /api/smart by status code and outcome (success or the error code).",
                ["code", "outcome"],
                registry=r,
            )
        )
        self.request_duration = Labelled(
            Histogram(
                "smart_request_duration_seconds",
                "Time from receiving an /api/smart request to having its answer, by outcome.",
                ["outcome"],
                buckets=REQUEST_BUCKETS_S,
                registry=r,
            )
        )
        self.timeout_used = Histogram(
            "smart_request_timeout_used_ratio",
            "Elapsed time over the client's timeout, for requests that gave one.",
            buckets=TIMEOUT_USED_BUCKETS,
            registry=r,
        )
        self.attempts = Labelled(
            Counter(
                "smart_upstream_attempts",
                "Upstream calls made, by attempt number (1 = first, 2+ = hedges) and outcome.",
                ["attempt", "outcome"],
                registry=r,
            )
        )
        self.attempt_duration = Labelled(
            Histogram(
                "smart_upstream_attempt_duration_seconds",
                "Duration of one upstream call, until its answer, failure or cancellation.",
                ["outcome"],
                buckets=ATTEMPT_BUCKETS_S,
                registry=r,
            )
        )
        self.hedges = Labelled(
            Counter(
                "smart_hedges",
                "Requests whose hedges fired, by why: the delay passed or attempt 1 failed early.",
                ["trigger"],
                registry=r,
            )
        )
        self.hedges_suppressed = Counter(
            "smart_hedges_suppressed",
            "Hedged attempts the hedge budget refused to start.",
            registry=r,
        )
        self.reconnects = Labelled(
            Counter(
                "smart_upstream_reconnects",
                "Attempts sent again at once on a new connection, by attempt number: the "
                "kept-alive one they took had been closed by the upstream before answering.",
                ["attempt"],
                registry=r,
            )
        )
        self.wins = Labelled(
            Counter(
                "smart_wins",
                "Successful responses by the attempt whose answer was used.",
                ["attempt"],
                registry=r,
            )
        )
        self.rejected = Labelled(
            Counter(
                "smart_rejected",
                "Requests refused without calling the upstream (503), by reason.",
                ["reason"],
                registry=r,
            )
        )
        self.requests_in_flight = Gauge(
            "smart_requests_in_flight",
            "Admitted /api/smart requests being served, summed over live workers.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.in_flight_limit = Gauge(
            "smart_in_flight_limit",
            "Admitted /api/smart requests live workers would serve at once now, summed "
            "(the cap, lowered while a worker's event loop lags).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.in_flight_ceiling = Gauge(
            "smart_in_flight_ceiling",
            "Most /api/smart requests live workers may hold at once, summed: what their "
            "descriptors and memory afford, or SMART_MAX_IN_FLIGHT.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.worker_connections = Gauge(
            "smart_worker_connections",
            "Client connections live workers accept at once, summed.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.descriptor_limit = Gauge(
            "smart_descriptor_limit",
            "The soft RLIMIT_NOFILE live workers run with (raised to the hard one), summed.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.descriptors_exhausted = Labelled(
            Counter(
                "smart_descriptors_exhausted",
                "accept() of a client or connect() to the upstream that failed for lack of "
                "file descriptors (EMFILE, ENFILE), by where.",
                ["where"],
                registry=r,
            )
        )
        self.attempts_in_flight = Gauge(
            "smart_upstream_attempts_in_flight",
            "Upstream calls open now, summed over live workers.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self._zero(attempts_per_request)

    def _zero(self, attempts_per_request: int) -> None:
        """Create the known series at 0, so that rate() and ratios work from the start."""
        for code, outcome in REQUEST_OUTCOMES:
            self.requests(code, outcome)
            self.request_duration(outcome)
        numbers = [str(n) for n in range(1, attempts_per_request + 1)]
        for outcome in ATTEMPT_OUTCOMES:
            self.attempt_duration(outcome)
            for number in numbers:
                self.attempts(number, outcome)
        for number in numbers:
            self.wins(number)
            self.reconnects(number)
        for trigger in HEDGE_TRIGGERS:
            self.hedges(trigger)
        self.rejected("overloaded")
        for where in ("accept", "connect"):
            self.descriptors_exhausted(where)

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every worker's metrics (or this app's), and its type."""
        registry = self.registry
        if registry is None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST


def build_metrics(attempts_per_request: int) -> Metrics:
    """Multiprocess metrics when gunicorn set PROMETHEUS_MULTIPROC_DIR, else per-app ones."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    # prometheus_client picks its value storage once, when it is first imported; if
    # the directory was set only after that, files would never be written.
    multiprocess = bool(getattr(values.ValueClass, "_multiprocess", False))
    if directory and multiprocess and os.path.isdir(directory):
        return Metrics(None, attempts_per_request)
    if directory:
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR is set but unusable; /metrics shows this worker only",
            extra={"path": directory},
        )
    return Metrics(CollectorRegistry(auto_describe=True), attempts_per_request)
