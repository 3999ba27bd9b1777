"""The naive baseline: the hedger most people would write first, on the same stack.

Flask, gevent and ``requests.get`` with no tuning: a fresh session (and connection) per
attempt, environment merging on every call, Flask's ``jsonify``. Same rules as smart
(attempt 1 at once; two hedges at 300 ms or when it fails; first success wins; the
rest are killed), so the benchmark compares implementations, not policies. Run it with
``gunicorn -c gunicorn.conf.py bench.naive_app:app``.
"""

from __future__ import annotations

import os

import gevent
import requests
from flask import Flask, jsonify

UPSTREAM_URL = os.environ.get("SMART_UPSTREAM_URL", "http://127.0.0.1:8081/api/work")
HEDGE_DELAY_S = 0.3
FANOUT = int(os.environ.get("SMART_HEDGE_FANOUT", "2"))
ATTEMPT_TIMEOUT_S = 3.0

app = Flask(__name__)


def attempt(number: int) -> dict[str, object] | None:
    # The attempt header only lets the simulator count calls per request, as for smart.
    headers = {"X-Smart-Attempt": str(number)}
    try:
        response = requests.get(UPSTREAM_URL, headers=headers, timeout=ATTEMPT_TIMEOUT_S)
        if response.status_code == 200:
            payload = response.json()
            if isinstance(payload, dict) and type(payload.get("time")) is int:
                return payload
    except (requests.RequestException, ValueError):
        pass
    return None


@app.get("/healthz")
def healthz() -> object:
    return jsonify(status="ok")


@app.get("/api/smart")
def smart() -> object:
    running = [gevent.spawn(attempt, 1)]
    hedged = FANOUT == 0
    try:
        with gevent.Timeout(ATTEMPT_TIMEOUT_S + HEDGE_DELAY_S, False):
            while running:
                ready = gevent.wait(running, timeout=None if hedged else HEDGE_DELAY_S, count=1)
                if ready:
                    running.remove(ready[0])
                    if ready[0].value is not None:
                        return jsonify(ready[0].value)
                if not hedged:
                    running += [gevent.spawn(attempt, 2 + n) for n in range(FANOUT)]
                    hedged = True
        return jsonify(error="upstream_failed"), 502
    finally:
        gevent.killall(running, block=False)
