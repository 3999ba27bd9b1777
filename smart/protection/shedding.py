"""Refusing excess ``/api/smart`` requests at the WSGI edge, before Flask sees them.

A refusal is the work a worker does when it has no capacity left, so it must cost as
little as possible: no routing, no request object, no response object, and a log line
only for the first few each second (``telemetry.RefusalLog``). This middleware owns
the in-flight slot of every ``/api/smart`` request: it takes one (or answers 503 at
once) and gives it back when the app has answered.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import gevent
from gevent.socket import wait_read

from smart.edge import errors
from smart.edge.disconnect import raw_socket
from smart.edge.params import request_id_from
from smart.observability.logs import REQUEST_LOGGED
from smart.observability.telemetry import Telemetry
from smart.protection.admission import InFlightLimiter

SMART_PATH = "/api/smart"
#: Set in the environ by the worker (``smart/lifecycle/worker.py``) while nearly all the client
#: connections it accepts are open: a refused connection is then closed at once, not
#: paused, so that its slot goes to a connection waiting in the kernel's listen queue
#: (a new client, a health check) instead of to the same client's next retry, which
#: now waits its turn in that queue.
CONNECTIONS_CROWDED = "smart.connections_crowded"
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
        if environ.get(CONNECTIONS_CROWDED):
            client = environ.get("gunicorn.socket")
            return PausedAnswer(body, 0.0, 0.0, self.limiter.full, hang_up=lambda: _hang_up(client))
        if self.pause_s > 0:
            client = environ.get("gunicorn.socket")
            watch = None if client is None else partial(_next_bytes, client)
            return PausedAnswer(
                body, self.pause_s, self.pause_max_s, self.limiter.full, next_bytes=watch
            )
        return [body]


#: What ``PausedAnswer.next_bytes`` saw of the connection after a refusal.
RETRIED, QUIET, GONE = "retried", "quiet", "gone"
#: A retry that arrives within this share of the pause came at once, ignoring
#: ``Retry-After`` (wrk's retry comes within a millisecond); one that honours it comes
#: after the whole pause, which is ``Retry-After`` by default.
EARLY_SHARE = 0.5


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

    Only a client that retried at once is paced. With ``next_bytes`` (wait up to the
    given seconds for the connection's next bytes; ``RETRIED``, ``QUIET`` or
    ``GONE``), the pause first watches the connection for ``EARLY_SHARE`` of
    ``pause_s``: if nothing came, the client is honouring ``Retry-After`` (or is idle),
    and its retry is read the moment it comes, not at the end of a longer pause.

    ``hang_up``, when given, ends the connection after the pause: the server then
    reads EOF instead of the client's next request and closes it.
    """

    def __init__(
        self,
        body: bytes,
        pause_s: float,
        max_s: float,
        still_full: Callable[[], bool],
        sleep: Callable[[float], object] = gevent.sleep,
        hang_up: Callable[[], None] | None = None,
        next_bytes: Callable[[float], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.body = body
        self.pause_s = pause_s
        self.max_s = max_s
        self.still_full = still_full
        self._sleep = sleep
        self.hang_up = hang_up
        self.next_bytes = next_bytes
        self._clock = clock

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    def close(self) -> None:
        pause_s = held_s = self.pause_s
        if pause_s > 0 and self.next_bytes is not None:
            started = self._clock()
            if self.next_bytes(pause_s * EARLY_SHARE) != RETRIED:
                return
            self._sleep(max(0.0, pause_s - (self._clock() - started)))
        elif pause_s > 0:
            self._sleep(pause_s)
        while held_s < self.max_s and self.still_full():
            step = min(pause_s, self.max_s - held_s)
            self._sleep(step)
            held_s += step
        if self.hang_up is not None:
            self.hang_up()


def _next_bytes(client: Any, within_s: float) -> str:
    """Wait up to ``within_s`` for ``client`` to turn readable; what it then holds."""
    try:
        wait_read(client.fileno(), timeout=within_s)
    except TimeoutError:
        return QUIET
    except OSError:
        return GONE
    raw = raw_socket(client)  # peek without gevent's wait for data
    try:
        data = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return QUIET
    except OSError:
        return GONE
    return RETRIED if data else GONE


def _hang_up(client: Any) -> None:
    """Shut the client connection down; the server's next read sees EOF."""
    if client is None:
        return
    with contextlib.suppress(OSError):  # the client may have gone already
        client.shutdown(socket.SHUT_RDWR)
