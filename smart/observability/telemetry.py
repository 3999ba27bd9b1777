"""What smart tells operators about each request: the log line, metrics and traces.

The HTTP edge hands over a ``RequestRecord`` built from the ``HedgeResult``; this
module turns it into signals. Disabled signals cost a None check, nothing more.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from smart.config import Settings
from smart.hedging.hedge import Attempt, HedgeResult
from smart.hedging.outcome import Kind, Outcome
from smart.observability.metrics import Metrics, build_metrics
from smart.observability.tracing import Headers, RequestSpan, Tracing, tracing_from_env
from smart.protection.capacity import Capacity
from smart.protection.exhaustion import ExhaustionLog, connect_exhausted

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("smart.request")


#: Refusals (503 ``overloaded``) logged one by one per second and worker; the rest
#: are counted into one line. A log line costs about as much CPU as the refusal
#: itself, and refusals come exactly when the worker has no CPU to spare.
REFUSALS_LOGGED_PER_S = 10


class Fetch(Protocol):
    """``UpstreamClient.fetch_once`` with the request's own arguments bound."""

    def __call__(
        self, number: int, t0: float, *, headers: Mapping[str, str] | None = None
    ) -> Outcome: ...


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished /api/smart request, as the edge saw it."""

    request_id: str
    status: int
    outcome: str  # "success" or the error code of the response
    timeout_ms: int | None
    elapsed_s: float
    result: HedgeResult | None  # None when no attempt was started (400, 503)
    span: RequestSpan | None = None  # None when tracing is off
    remote_addr: str | None = None
    user_agent: str | None = None
    query: str | None = None


class Telemetry:
    """Records requests and attempts. One per worker."""

    def __init__(
        self, log_requests: bool, metrics: Metrics | None = None, tracing: Tracing | None = None
    ) -> None:
        self.log_requests = log_requests
        self.metrics = metrics
        self.tracing = tracing
        self.refusal_log = RefusalLog() if log_requests else None
        self.exhaustion_log = ExhaustionLog()

    @classmethod
    def build(cls, settings: Settings, tracer_provider: TracerProvider | None = None) -> Telemetry:
        """Metrics as ``SMART_METRICS`` says; tracing from ``tracer_provider`` if given,
        else as the ``OTEL_*`` variables say."""
        metrics = build_metrics(settings.attempts_per_request) if settings.metrics else None
        if tracer_provider is not None:
            tracing: Tracing | None = Tracing(tracer_provider, settings.upstream_url)
        else:
            tracing = tracing_from_env(os.environ, settings.upstream_url)
        logging.getLogger("smart").info(
            "telemetry",
            extra={
                "metrics": "off" if metrics is None else metrics.mode,
                "tracing": "off" if tracing is None else "on",
                "request_log": settings.log_requests,
            },
        )
        return cls(settings.log_requests, metrics, tracing)

    def close(self) -> None:
        """Export the spans still queued (a worker's last seconds of traces)."""
        if self.tracing is not None:
            self.tracing.shutdown()

    def request_started(self, headers: Headers, request_id: str) -> RequestSpan | None:
        """The request's server span, when tracing is on."""
        if self.tracing is None:
            return None
        return self.tracing.start_request(headers, request_id)

    def admitted(self) -> None:
        if self.metrics is not None:
            self.metrics.requests_in_flight.inc()

    def capacity_decided(self, capacity: Capacity) -> None:
        if self.metrics is not None:
            self.metrics.in_flight_ceiling.set(capacity.max_in_flight)
            self.metrics.worker_connections.set(capacity.worker_connections)
            self.metrics.descriptor_limit.set(capacity.descriptors)

    def reconnected(self, attempt: int) -> None:
        """Attempt ``attempt`` is sent again on a new connection (counted as it happens:
        a hedge cancelled afterwards still cost the upstream that call)."""
        if self.metrics is not None:
            self.metrics.reconnects(str(attempt)).inc()

    def limit_changed(self, limit: int) -> None:
        if self.metrics is not None:
            self.metrics.in_flight_limit.set(limit)

    def released(self) -> None:
        if self.metrics is not None:
            self.metrics.requests_in_flight.dec()

    def instrument(self, fetch: Fetch, span: RequestSpan | None) -> Attempt:
        """``fetch`` as the hedger's attempt, counted in flight and traced as enabled.

        The wrappers run in the attempt's greenlet, so a killed attempt unwinds through
        their ``finally`` and an attempt killed before it ran never counts.
        """
        metrics = self.metrics
        if span is None:
            if metrics is None:
                return fetch
            gauge = metrics.attempts_in_flight

            def counted(number: int, t0: float) -> Outcome:
                gauge.inc()
                try:
                    return fetch(number, t0)
                finally:
                    gauge.dec()

            return counted

        def traced(number: int, t0: float) -> Outcome:
            headers = span.start_attempt(number)
            if metrics is not None:
                metrics.attempts_in_flight.inc()
            try:
                return fetch(number, t0, headers=headers)
            finally:
                if metrics is not None:
                    metrics.attempts_in_flight.dec()
                span.attempt_ended(number)

        return traced

    def request_finished(self, record: RequestRecord) -> None:
        if self.metrics is not None:
            record_metrics(self.metrics, record)
        if record.result is not None:
            for outcome in record.result.outcomes:
                if connect_exhausted(outcome):
                    self.descriptors_exhausted("connect")
        if record.span is not None:
            record.span.finish(record.status, record.outcome, record.timeout_ms, record.result)
        if self.log_requests:
            log.info("request", extra=log_fields(record))

    def refused(self, request_id: str, elapsed_s: float, remote_addr: str | None = None) -> None:
        """A request shed at the edge with a 503 ``overloaded`` (``shedding.py``)."""
        metrics = self.metrics
        if metrics is not None:
            metrics.requests("503", "overloaded").inc()
            metrics.request_duration("overloaded").observe(elapsed_s)
            metrics.rejected("overloaded").inc()
        if self.refusal_log is not None:
            self.refusal_log.refused(request_id, elapsed_s, remote_addr)

    def descriptors_exhausted(self, where: str) -> None:
        """``accept`` or an upstream ``connect`` failed for lack of descriptors."""
        if self.metrics is not None:
            self.metrics.descriptors_exhausted(where).inc()
        self.exhaustion_log.failed(where)

    def tick(self) -> None:
        """Called every few seconds: log what is owed (refusals not logged one by one,
        descriptor failures since the last line)."""
        if self.refusal_log is not None:
            self.refusal_log.flush()
        self.exhaustion_log.flush()

    def request_crashed(self) -> None:
        """A bug ended an /api/smart request in a 500 (its traceback is logged apart)."""
        if self.metrics is not None:
            self.metrics.requests("500", "internal_error").inc()


class RefusalLog:
    """The first ``REFUSALS_LOGGED_PER_S`` refusals of each second, then a count."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._second = -1
        self._logged = 0
        self._unlogged = 0

    def refused(self, request_id: str, elapsed_s: float, remote_addr: str | None = None) -> None:
        second = int(self._clock())
        if second != self._second:
            self.flush()
            self._second = second
        if self._logged < REFUSALS_LOGGED_PER_S:
            self._logged += 1
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "status": 503,
                    "outcome": "overloaded",
                    "timeout_ms": None,
                    "elapsed_ms": round(elapsed_s * 1000, 3),
                    "remote_addr": remote_addr,
                },
            )
        else:
            self._unlogged += 1

    def flush(self) -> None:
        """Log how many refusals went unlogged since the last flush, if any."""
        if self._unlogged:
            log.warning(
                "refusals not logged one by one",
                extra={"status": 503, "outcome": "overloaded", "count": self._unlogged},
            )
        self._logged = 0
        self._unlogged = 0


def record_metrics(metrics: Metrics, record: RequestRecord) -> None:
    """Count one finished request; every counter here adds up across workers."""
    metrics.requests(str(record.status), record.outcome).inc()
    metrics.request_duration(record.outcome).observe(record.elapsed_s)
    if record.outcome == "overloaded":
        metrics.rejected("overloaded").inc()
    result = record.result
    if result is None:
        return
    if record.timeout_ms is not None:
        metrics.timeout_used.observe(record.elapsed_s * 1000 / record.timeout_ms)
    for o in result.outcomes:
        if o.sent:  # one per call the upstream received
            group = o.group
            metrics.attempts(str(o.attempt), group).inc()
            metrics.attempt_duration(group).observe(o.elapsed_s)
    if result.winner is not None:
        metrics.wins(str(result.winner.attempt)).inc()
    if result.trigger is not None:
        metrics.hedges(result.trigger).inc()
    if result.hedges_suppressed:
        metrics.hedges_suppressed.inc(result.hedges_suppressed)


def log_fields(record: RequestRecord) -> dict[str, object]:
    """The fields of a request's log line; joinable to upstream logs by request_id."""
    fields: dict[str, object] = {
        "request_id": record.request_id,
        "status": record.status,
        "outcome": record.outcome,
        "timeout_ms": record.timeout_ms,
        "elapsed_ms": round(record.elapsed_s * 1000, 1),
        "query": record.query,
        "remote_addr": record.remote_addr,
        "user_agent": record.user_agent,
    }
    if record.span is not None:
        fields["trace_id"] = record.span.trace_id
    result = record.result
    if result is not None:
        winner = result.winner.attempt if result.winner else None
        fields["winner"] = winner
        fields["hedge_trigger"] = result.trigger
        fields["hedges_suppressed"] = result.hedges_suppressed
        fields["hedges_too_late"] = result.hedges_too_late
        fields["attempts"] = [
            {
                **o.summary(),
                "won": o.attempt == winner,
                "cancelled": o.kind is Kind.CANCELLED,
                "sent": o.sent,
                "status": o.status,
                "detail": o.detail or None,
                "reconnected": o.reconnected,
            }
            for o in result.outcomes
        ]
    return fields
