"""What smart tells operators about each request: the log line (and metrics, traces).

The HTTP edge hands over a ``RequestRecord``; this module turns it into signals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from smart.hedge import HedgeResult

log = logging.getLogger("smart.request")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished /api/smart request, as the edge saw it."""

    request_id: str
    status: int
    outcome: str  # "success" or the error code of the response
    timeout_ms: int | None
    elapsed_s: float
    result: HedgeResult | None  # None when no attempt was started (400, 503)


class Telemetry:
    """Records finished requests. One per worker."""

    def __init__(self, log_requests: bool) -> None:
        self.log_requests = log_requests

    def request_finished(self, record: RequestRecord) -> None:
        if self.log_requests:
            log.info("request", extra=log_fields(record))


def log_fields(record: RequestRecord) -> dict[str, object]:
    """The fields of a request's log line; joinable to upstream logs by request_id."""
    fields: dict[str, object] = {
        "request_id": record.request_id,
        "status": record.status,
        "outcome": record.outcome,
        "timeout_ms": record.timeout_ms,
        "elapsed_ms": round(record.elapsed_s * 1000, 1),
    }
    result = record.result
    if result is not None:
        winner = result.winner.attempt if result.winner else None
        fields["hedge_trigger"] = result.trigger
        fields["hedges_suppressed"] = result.hedges_suppressed
        fields["hedges_too_late"] = result.hedges_too_late
        fields["attempts"] = [
            {**o.summary(), "won": o.attempt == winner, "detail": o.detail or None}
            for o in result.outcomes
        ]
    return fields
