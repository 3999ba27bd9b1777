"""Endpoints for the platform, not for clients: liveness, readiness and metrics.

They never touch the upstream and are never shed by admission control.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app
from werkzeug.exceptions import NotFound

from smart.lifecycle.runtime import Runtime

bp = Blueprint("probes", __name__)


@bp.get("/healthz", provide_automatic_options=False)
def healthz() -> Response:
    """Alive: the worker's loop is turning. Nothing else is checked, on purpose."""
    return _json(200, b'{"status":"ok"}')


@bp.get("/readyz", provide_automatic_options=False)
def readyz() -> Response:
    """Ready for new traffic: false from SIGTERM on, while in-flight requests finish."""
    runtime: Runtime = current_app.extensions["smart"]
    if runtime.draining:
        return _json(503, b'{"status":"draining"}')
    return _json(200, b'{"status":"ready"}')


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format, every worker's samples merged (see smart.observability.metrics)."""
    runtime: Runtime = current_app.extensions["smart"]
    if runtime.telemetry.metrics is None:
        raise NotFound("metrics are off (SMART_METRICS=false)")
    body, content_type = runtime.telemetry.metrics.exposition()
    response = Response(body, 200, content_type=content_type)
    response.headers["Cache-Control"] = "no-store"
    return response


def _json(status: int, body: bytes) -> Response:
    response = Response(body, status, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response
