"""The application factory: settings -> logging -> runtime -> routes -> error handlers.

gunicorn calls ``create_app()`` once per worker, after the fork and after gevent's
monkey patching, so everything built here belongs to one worker.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from smart import api, debug, errors, probes
from smart.config import Settings
from smart.logs import configure_logging
from smart.params import request_id_from
from smart.runtime import Runtime
from smart.shedding import Shedder
from smart.shutdown import drain_on_sigterm

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("smart")


def create_app(
    settings: Settings | None = None, *, tracer_provider: TracerProvider | None = None
) -> Flask:
    """Build one worker's app; ``settings`` defaults to the environment's, and tracing
    to what the ``OTEL_*`` variables ask for unless a ``tracer_provider`` is given."""
    settings = Settings.from_env() if settings is None else settings
    configure_logging(settings.log_level)
    app = Flask("smart")
    runtime = Runtime.build(settings, tracer_provider)
    app.extensions["smart"] = runtime
    app.wsgi_app = Shedder(  # type: ignore[method-assign]
        app.wsgi_app,
        runtime.limiter,
        runtime.telemetry,
        settings.retry_after_s,
        settings.refusal_pause_s,
        settings.refusal_pause_max_s,
    )
    app.register_blueprint(api.bp)
    app.register_blueprint(probes.bp)
    if settings.debug_endpoints:
        app.register_blueprint(debug.bp)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    drain_on_sigterm(runtime)
    log.info("worker ready", extra={"settings": settings.public()})
    return app


def _http_error(exc: HTTPException) -> Response:
    error = errors.from_http_status(exc.code or 500, exc.description)
    response = api.render(error, _request_id())
    if exc.code == 405 and exc.response is None:
        # RFC 9110 15.5.6: a 405 must list the methods the resource allows.
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
    return response


def _unexpected_error(exc: Exception) -> Response:
    log.exception("unhandled error", extra={"request_id": _request_id(), "path": request.path})
    if request.endpoint == "api.smart":
        runtime: Runtime = current_app.extensions["smart"]
        runtime.telemetry.request_crashed()
    return api.render(errors.internal_error(), _request_id())


def _request_id() -> str:
    return request_id_from(request.headers.get("X-Request-ID"))
