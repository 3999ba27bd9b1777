"""Refusing excess ``/api/smart`` requests at the WSGI edge, before Flask sees them.

A refusal is the work a worker does when it has no capacity left, so it must cost as
little as possible: no routing, no request object, no response object, and a log line
only for the first few each second (``telemetry.RefusalLog``). This middleware owns
the in-flight slot of every ``/api/smart`` request: it takes one (or answers 503 at
once) and gives it back when the app has answered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent

from smart.edge import errors
from smart.edge.params import request_id_from
from smart.observability.logs import REQUEST_LOGGED
from smart.observability.telemetry import Telemetry
from smart.protection.admission import InFlightLimiter

SMART_PATH = "/api/smart"
_ADMITTED_METHODS = frozenset({"GET", "HEAD"})  # others get Flask's 405, no slot needed

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Shedder:
    """WSGI middleware: an in-flight slot for each ``/api/smart`` request, or a 503."""

    def __init__(
        self,
        app: WsgiApp,
        limiter: InFlightLimiter,
        telemetry: Telemetry,
        retry_after_s: int,
        pause_s: float = 0.0,
        pause_max_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.telemetry = telemetry
        self.error = errors.overloaded(retry_after_s)
        self.pause_s = pause_s
        self.pause_max_s = max(pause_s, pause_max_s)
        self._clock = clock

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != SMART_PATH or environ["REQUEST_METHOD"] not in (
            _ADMITTED_METHODS
        ):
            return self.app(environ, start_response)
        limiter = self.limiter
        if not limiter.try_acquire():
            return self.refuse(environ, start_response)
        telemetry = self.telemetry
        telemetry.admitted()
        try:
            # The view has answered when this returns: a Flask response's body is
            # already built, so the slot is free before the bytes are sent.
            return self.app(environ, start_response)
        finally:
            limiter.release()
            telemetry.released()

    def refuse(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = self._clock()
        error = self.error
        request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID"))
        body = error.body(request_id)
        elapsed = self._clock() - started
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("X-Request-ID", request_id),
            ("Cache-Control", "no-store"),
            ("Server-Timing", f"total;dur={elapsed * 1000:.1f}"),
            *error.headers.items(),
        ]
        start_response("503 Service Unavailable", headers)
        telemetry = self.telemetry
        telemetry.refused(request_id, elapsed, environ.get("REMOTE_ADDR"))
        environ[REQUEST_LOGGED] = telemetry.log_requests
        if self.pause_s > 0:
            return PausedAnswer(body, self.pause_s, self.pause_max_s, self.limiter.full)
        return [body]


class PausedAnswer:
    """A response body whose ``close`` waits: the pause after a refusal.

    The server calls ``close`` once the body is sent and before it reads the next
    request on the connection. So the client has its 503 at once, and a client that
    ignores ``Retry-After`` and retries at once on the same connection waits in the
    socket's buffer, costing this worker a timer instead of another refusal. A client
    on a new connection does not wait at all.

    The wait is ``pause_s``, then another ``pause_s`` for as long as ``still_full()``
    says the worker would refuse the retry too, up to ``max_s`` in all: under a
    sustained closed-loop flood each connection costs one refusal per ``max_s``
    instead of one per ``pause_s``.
    """

    def __init__(
        self,
        body: bytes,
        pause_s: float,
        max_s: float,
        still_full: Callable[[], bool],
        sleep: Callable[[float], object] = gevent.sleep,
    ) -> None:
        self.body = body
        self.pause_s = pause_s
        self.max_s = max_s
        self.still_full = still_full
        self._sleep = sleep

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    def close(self) -> None:
        pause_s = held_s = self.pause_s
        self._sleep(pause_s)
        while held_s < self.max_s and self.still_full():
            step = min(pause_s, self.max_s - held_s)
            self._sleep(step)
            held_s += step
