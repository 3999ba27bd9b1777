"""Running out of descriptors: counted, logged once in a while, never a traceback.

The limits of ``capacity.py`` keep a worker inside its descriptors, but something
else in the process (or an operator's override) can still use them up. Then
``accept`` and ``connect`` fail with EMFILE; this module turns that into a metric and
a rate-limited JSON line while gevent's server backs off and the worker serves what it
has. Imports nothing from the package but ``outcome``.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import Any

from gevent.baseserver import BaseServer
from gevent.hub import Hub

from smart.hedging.outcome import Kind, Outcome

log = logging.getLogger("smart")

#: errno values that mean the process or the system has no descriptor (or socket
#: buffer) to give: retrying later may work, nothing is wrong with the connection.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: At most one log line per this many seconds and worker; the rest are counted in it.
LOG_INTERVAL_S = 10.0

#: ``report(where)``: one failure for lack of descriptors, at ``"accept"`` or ``"connect"``.
Report = Callable[[str], None]


class ExhaustionLog:
    """The first failure at once, then one line per ``LOG_INTERVAL_S`` with a count."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._next_line = 0.0
        self._unlogged: dict[str, int] = {}

    def failed(self, where: str) -> None:
        self._unlogged[where] = self._unlogged.get(where, 0) + 1
        self.flush()

    def flush(self) -> None:
        """Log the failures not yet logged, if any and if a line is due (also called
        by the housekeeping, so that the last ones are logged when failures stop)."""
        if not self._unlogged or self._clock() < self._next_line:
            return
        self._next_line = self._clock() + LOG_INTERVAL_S
        counts, self._unlogged = self._unlogged, {}
        log.warning(
            "out of file descriptors: accepting and connecting back off",
            extra={"failures": counts, "interval_s": LOG_INTERVAL_S},
        )


def is_exhaustion(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno in EXHAUSTED


def connect_exhausted(outcome: Outcome) -> bool:
    """Whether an attempt failed to connect because the worker had no descriptor.

    urllib3 wraps the ``OSError`` of ``socket()`` into its own errors, keeping only
    its text, so the errno is read from the outcome's detail.
    """
    if outcome.kind is not Kind.CONNECT_ERROR:
        return False
    detail = outcome.detail
    return any(f"[Errno {code}]" in detail for code in EXHAUSTED)


def guard_accept(hub: Hub, report: Report) -> Callable[[], None]:
    """Keep ``accept`` failures for lack of descriptors out of ``hub``'s traceback
    printer; returns the undo.

    gevent's ``BaseServer._do_read`` hands an ``accept`` error to the hub's
    ``handle_error``, which prints it, and then stops accepting for a delay that
    doubles from 10 ms to 1 s while the errors last. That back-off is kept; only the
    traceback becomes a count. The loop looks ``handle_error`` up on the hub at every
    error, so an instance attribute replaces it (gevent/_ffi/loop.py).
    """
    original = hub.handle_error

    def handle_error(context: Any, kind: Any, value: Any, tb: Any) -> None:
        server = context[-1] if isinstance(context, tuple) and context else context
        if isinstance(server, BaseServer) and is_exhaustion(value):
            report("accept")
            return
        original(context, kind, value, tb)

    hub.handle_error = handle_error

    def undo() -> None:
        if hub.handle_error is handle_error:
            del hub.handle_error

    return undo
