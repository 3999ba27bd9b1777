"""The HTTP edge of failure: every error smart answers, as one JSON shape.

Domain errors (``HedgeError``, ``InvalidTimeout``) stay free of HTTP; this module
alone decides their status code, error code and message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from smart.hedging.hedge import AllAttemptsFailed, Cancelled, DeadlineExceeded, HedgeError
from smart.hedging.outcome import Kind, Limit, Outcome


@dataclass(frozen=True, slots=True)
class ApiError:
    """One error response: ``{"error", "message", "request_id", "attempts"}``."""

    status: int
    code: str
    message: str
    attempts: tuple[Outcome, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self, request_id: str) -> bytes:
        return json.dumps(
            {
                "error": self.code,
                "message": self.message,
                "request_id": request_id,
                "attempts": [o.summary() for o in self.attempts],
            },
            ensure_ascii=False,
        ).encode()


def invalid_timeout(message: str) -> ApiError:
    return ApiError(400, "invalid_timeout", message)


def overloaded(retry_after_s: int) -> ApiError:
    return ApiError(
        503,
        "overloaded",
        f"this worker is serving all the requests it can; retry after {retry_after_s} s",
        headers={"Retry-After": str(retry_after_s)},
    )


def internal_error() -> ApiError:
    return ApiError(500, "internal_error", "the server failed to answer; see its log")


def from_hedge_error(
    exc: HedgeError, timeout_ms: int | None, *, attempt_limit_ms: int, connect_limit_ms: int
) -> ApiError:
    """502 when every attempt failed, 504 when time ran out first, 499 when the client
    left first.

    All attempts failing *by timing out* is a 504 too: as with any gateway, the
    upstream did not answer in time, which is different from answering badly. The
    message names the limit that ran out: the request's ``timeout``, or the setting
    that cut the attempts.
    """
    outcomes = exc.result.outcomes
    if isinstance(exc, Cancelled):
        # nginx's 499: no client is left to read it; it is the status of the log line
        # and the metrics, so that work given up on is told from work that failed.
        return ApiError(
            499,
            "client_closed",
            "the client closed its connection before the answer was decided",
            outcomes,
        )
    if isinstance(exc, DeadlineExceeded) and not outcomes:
        return ApiError(
            504,
            "upstream_timeout",
            f"a timeout of {timeout_ms} ms leaves no time for an upstream attempt",
        )
    if isinstance(exc, DeadlineExceeded):
        return ApiError(
            504,
            "upstream_timeout",
            f"no successful upstream response within {timeout_ms} ms",
            outcomes,
        )
    assert isinstance(exc, AllAttemptsFailed)
    if outcomes and all(o.kind is Kind.TIMEOUT for o in outcomes):
        message = _timed_out(outcomes, attempt_limit_ms, connect_limit_ms)
        return ApiError(504, "upstream_timeout", message, outcomes)
    message = f"all {len(outcomes)} upstream attempts failed"
    if outcomes and all(o.limit is Limit.CONNECT for o in outcomes):
        # No connection (or no TLS handshake) finished: the answer is not the upstream's
        # failure to answer but to be reached, which is what the outcomes say.
        message += (
            f" to connect within SMART_CONNECT_TIMEOUT_MS ({connect_limit_ms} ms each; "
            "TLS handshake included)"
        )
    return ApiError(502, "upstream_failed", message, outcomes)


def _timed_out(outcomes: tuple[Outcome, ...], attempt_limit_ms: int, connect_limit_ms: int) -> str:
    total = len(outcomes)
    connecting = sum(1 for o in outcomes if o.limit is Limit.CONNECT)
    connect = f"SMART_CONNECT_TIMEOUT_MS: {connect_limit_ms} ms"
    attempt = f"SMART_ATTEMPT_TIMEOUT_MS: {attempt_limit_ms} ms"
    if connecting == total:
        return f"all {total} upstream attempts timed out while connecting ({connect} each)"
    if connecting == 0:
        return f"all {total} upstream attempts timed out ({attempt} each)"
    return (
        f"all {total} upstream attempts timed out: {connecting} while connecting "
        f"({connect}), {total - connecting} before answering in full ({attempt})"
    )


def from_http_status(status: int, description: str | None) -> ApiError:
    """Werkzeug's own errors (404, 405, 413…) in smart's shape."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(status, "bad_request" if 400 <= status < 500 else "internal_error")
    if status >= 500:
        return internal_error()
    return ApiError(status, code, description or code.replace("_", " "))
