"""``GET /api/smart``: parse, admit, hedge, answer. The only view that calls upstream."""

from __future__ import annotations

import time
from functools import partial

from flask import Blueprint, Response, current_app, request

from smart.edge import errors
from smart.edge.disconnect import ClientWatch
from smart.edge.errors import ApiError
from smart.edge.params import InvalidTimeout, parse_timeout_ms, request_id_from
from smart.hedging.hedge import HedgeError, HedgeResult, hedge
from smart.lifecycle.runtime import Runtime
from smart.observability.logs import REQUEST_LOGGED
from smart.observability.telemetry import RequestRecord
from smart.observability.tracing import RequestSpan

bp = Blueprint("api", __name__)


@bp.get("/api/smart", provide_automatic_options=False)
def smart() -> Response:
    t0 = time.monotonic()
    runtime: Runtime = current_app.extensions["smart"]
    settings = runtime.settings
    request_id = request_id_from(request.headers.get("X-Request-ID"))
    span = runtime.telemetry.request_started(request.headers, request_id)
    timeout_ms: int | None = None
    result: HedgeResult | None = None
    try:
        timeout_ms = parse_timeout_ms(request.args.getlist("timeout"), settings.max_timeout_ms)
    except InvalidTimeout as exc:
        return _fail(runtime, errors.invalid_timeout(str(exc)), request_id, None, t0, span=span)
    # The in-flight slot was taken before Flask saw the request (``shedding.py``).
    try:
        if runtime.budget is not None:
            runtime.budget.record_first()
        # With a deadline the hedger kills the attempts; without one each is bounded.
        limit_s = None if timeout_ms is not None else settings.attempt_timeout_s
        fetch = partial(runtime.client.fetch_once, request_id=request_id, limit_s=limit_s)
        # A client that hangs up cancels its attempts (Envoy, Go's request context).
        with ClientWatch(request.environ.get("gunicorn.socket")) as client:
            result = hedge(
                runtime.telemetry.instrument(fetch, span),
                runtime.hedge_policy,
                pool=runtime.pool,
                deadline_s=None if timeout_ms is None else timeout_ms / 1000,
                t0=t0,
                cancel=client.gone,
            )
    except HedgeError as exc:
        error = errors.from_hedge_error(
            exc,
            timeout_ms,
            attempt_limit_ms=settings.attempt_timeout_ms,
            connect_limit_ms=settings.connect_timeout_ms,
        )
        return _fail(runtime, error, request_id, timeout_ms, t0, exc.result, span)
    return _succeed(runtime, result, request_id, timeout_ms, t0, span)


def _succeed(
    runtime: Runtime,
    result: HedgeResult,
    request_id: str,
    timeout_ms: int | None,
    t0: float,
    span: RequestSpan | None,
) -> Response:
    winner = result.winner
    assert winner is not None and winner.body is not None
    elapsed = time.monotonic() - t0
    response = Response(winner.body, 200, mimetype="application/json")
    response.headers.update(_attempt_headers(request_id, result))
    response.headers["X-Smart-Winner"] = str(winner.attempt)
    response.headers["Server-Timing"] = (
        f'upstream;dur={winner.elapsed_s * 1000:.1f};desc="attempt {winner.attempt}", '
        f"total;dur={elapsed * 1000:.1f}"
    )
    _record(runtime, request_id, 200, "success", timeout_ms, elapsed, result, span)
    return response


def _fail(
    runtime: Runtime,
    error: ApiError,
    request_id: str,
    timeout_ms: int | None,
    t0: float,
    result: HedgeResult | None = None,
    span: RequestSpan | None = None,
) -> Response:
    elapsed = time.monotonic() - t0
    response = render(error, request_id)
    if result is not None:
        response.headers.update(_attempt_headers(request_id, result))
    response.headers["Server-Timing"] = f"total;dur={elapsed * 1000:.1f}"
    _record(runtime, request_id, error.status, error.code, timeout_ms, elapsed, result, span)
    return response


def _record(
    runtime: Runtime,
    request_id: str,
    status: int,
    outcome: str,
    timeout_ms: int | None,
    elapsed: float,
    result: HedgeResult | None,
    span: RequestSpan | None,
) -> None:
    """Metrics, span and the request's one log line, which the access log then skips."""
    environ = request.environ
    record = RequestRecord(
        request_id,
        status,
        outcome,
        timeout_ms,
        elapsed,
        result,
        span,
        remote_addr=environ.get("REMOTE_ADDR"),
        user_agent=environ.get("HTTP_USER_AGENT"),
        query=environ.get("QUERY_STRING") or None,
    )
    runtime.telemetry.request_finished(record)
    environ[REQUEST_LOGGED] = runtime.telemetry.log_requests


def render(error: ApiError, request_id: str) -> Response:
    """The one place an ``ApiError`` becomes an HTTP response."""
    response = Response(error.body(request_id), error.status, mimetype="application/json")
    response.headers["X-Request-ID"] = request_id
    response.headers["Cache-Control"] = "no-store"
    response.headers.update(error.headers)
    return response


def _attempt_headers(request_id: str, result: HedgeResult) -> dict[str, str]:
    return {
        "X-Request-ID": request_id,
        "X-Smart-Attempts": str(result.attempts_started),
        "Cache-Control": "no-store",
    }
