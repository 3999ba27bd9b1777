"""``GET /debug/runtime``: what one worker holds right now, for hunting leaks.

Off unless ``SMART_DEBUG_ENDPOINTS`` is true: counting greenlets walks the heap, and
the numbers are of no use to clients. Never touches the upstream, never shed.
"""

from __future__ import annotations

import gc
import json
import os

from flask import Blueprint, Response, current_app
from greenlet import greenlet

from smart.lifecycle.runtime import Runtime

bp = Blueprint("debug", __name__)


@bp.get("/debug/runtime")
def runtime_state() -> Response:
    runtime: Runtime = current_app.extensions["smart"]
    state = {
        "pid": os.getpid(),
        "draining": runtime.draining,
        "requests_in_flight": runtime.limiter.in_flight,
        "upstream_attempts_in_flight": len(runtime.pool),
        "upstream_idle_connections": runtime.client.idle_connections(),
        "greenlets": live_greenlets(),
    }
    response = Response(json.dumps(state), 200, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def live_greenlets() -> int:
    """Greenlets of this process that have started and not finished, among the objects
    the garbage collector tracks: those the worker started before it froze its
    start-up objects out of collection (the hub, housekeeping) are not counted, so a
    fresh worker counts the few of its first connections and growth is what shows."""
    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet) and bool(obj))
