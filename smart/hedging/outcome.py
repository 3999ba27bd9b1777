"""What one upstream attempt came to, as plain data.

Shared by the hedging algorithm, the upstream client and the HTTP edge; imports
nothing from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """How an attempt ended. The values are the metric labels and log fields."""

    SUCCESS = "success"
    HTTP_STATUS = "http_status"  # any status but 200; the label carries the code
    INVALID_PAYLOAD = "invalid_payload"  # 200, but not {"time": <non-negative int>}
    BODY_TOO_LARGE = "body_too_large"
    CONNECT_ERROR = "connect_error"  # refused, unreachable, DNS, connect timeout
    TIMEOUT = "timeout"  # connected, but no complete answer within the attempt's limit
    RESET = "reset"  # the connection broke: reset, closed early, truncated, not HTTP
    TLS_ERROR = "tls_error"  # certificate refused, handshake failed, TLS alert or bad record
    CANCELLED = "cancelled"  # killed because the request was already decided
    ERROR = "error"  # a bug of ours; logged with its traceback


class Limit(StrEnum):
    """Which limit cut an attempt that ran out of time."""

    CONNECT = "connect"  # SMART_CONNECT_TIMEOUT_MS: opening the connection, TLS included
    ATTEMPT = "attempt"  # SMART_ATTEMPT_TIMEOUT_MS: the whole attempt


@dataclass(frozen=True, slots=True)
class Outcome:
    """One finished attempt. Times are seconds from the start of the request."""

    attempt: int
    kind: Kind
    started_s: float
    elapsed_s: float
    status: int | None = None
    body: bytes | None = None  # the upstream's payload, only when kind is SUCCESS
    detail: str = ""
    #: False for an attempt killed before its greenlet ever ran: the upstream never
    #: received it, so it is not counted as an upstream call.
    sent: bool = True
    #: The limit that ended it: for a ``TIMEOUT``, and for a ``CONNECT_ERROR`` or
    #: ``TLS_ERROR`` whose connect or TLS handshake did not finish in time.
    limit: Limit | None = None
    #: The kept-alive connection it took had been closed by the upstream before any
    #: answer, so it was sent again at once on a new connection.
    reconnected: bool = False

    @property
    def ok(self) -> bool:
        return self.kind is Kind.SUCCESS

    @property
    def label(self) -> str:
        """Fine-grained outcome for logs and error bodies: ``http_503``, ``timeout``…"""
        if self.kind is Kind.HTTP_STATUS:
            return f"http_{self.status}"
        return self.kind.value

    @property
    def group(self) -> str:
        """Coarse outcome for metric labels, bounded in cardinality: ``http_5xx``…"""
        if self.kind is Kind.HTTP_STATUS and self.status is not None:
            if 500 <= self.status <= 599:
                return "http_5xx"
            if 400 <= self.status <= 499:
                return "http_4xx"
            return "http_other"
        return self.kind.value

    def summary(self) -> dict[str, object]:
        """The attempt as it appears in error bodies and log lines."""
        return {
            "attempt": self.attempt,
            "outcome": self.label,
            "started_ms": round(self.started_s * 1000, 1),
            "elapsed_ms": round(self.elapsed_s * 1000, 1),
        }
