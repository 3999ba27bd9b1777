"""Graceful shutdown of one worker: from SIGTERM on, ``/readyz`` fails.

gunicorn does the rest of the drain itself (stop accepting, wait for the requests in
flight up to ``graceful_timeout``, exit 0); this module only tells the app.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import gevent

from smart.lifecycle.runtime import Runtime

log = logging.getLogger("smart")


def drain_on_sigterm(runtime: Runtime) -> bool:
    """Chain a handler in front of the server's own SIGTERM handler; True if installed.

    gunicorn's worker installs its handler before it loads the app, so the factory
    finds it here and keeps calling it. Without a server's handler (tests, scripts)
    nothing is installed: a SIGTERM must keep its default meaning there.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return False

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if not runtime.draining:
            runtime.draining = True
            # A signal handler may run inside gevent's hub, where nothing may block:
            # the log line is written from a greenlet of its own (as gunicorn does).
            gevent.spawn(
                log.info,
                "draining",
                extra={"requests_in_flight": runtime.limiter.in_flight},
            )
        previous(signum, frame)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: signals are not ours to handle
        return False
    return True
