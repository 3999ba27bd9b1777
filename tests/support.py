"""What the tests share besides fixtures: smart under gunicorn with the tests' defaults,
and small bounded waits. Real processes come from ``harness``; every network test
stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gevent
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import gunicorn
from harness.gunicorn import ROOT

__all__ = ["ROOT", "Gunicorn", "Servers", "open_fds", "scrape_total", "wait_until"]

#: What every test server runs with unless a test says otherwise.
TEST_DEFAULTS = {
    # The request log is what several tests read back.
    "SMART_LOG_REQUESTS": "true",
    # A fixed in-flight limit: a loaded CI box makes the event loop late, and the lag
    # limit would turn some of a test's requests into 503s. The tests of the lag limit
    # turn it on themselves.
    "SMART_LOOP_LAG_TARGET_MS": "0",
}


class Gunicorn(gunicorn.Gunicorn):
    """``harness.gunicorn.Gunicorn`` with ``TEST_DEFAULTS`` under the test's own ``env``."""

    def __init__(self, env: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__({**TEST_DEFAULTS, **env}, **kwargs)


class Servers:
    """Starts smart under gunicorn (``tests.support.Gunicorn``) and stops them all."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Gunicorn] = []

    def start(self, env: Mapping[str, str], *, workers: int = 1, **kwargs: Any) -> Gunicorn:
        """A started server; its logs and metrics under a directory of its own."""
        kwargs.setdefault("tmp_path", self.tmp_path / f"server-{len(self.started)}")
        server = Gunicorn(env, workers=workers, **kwargs)
        self.started.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        for server in reversed(self.started):
            server.stop()


def scrape_total(server: gunicorn.Gunicorn, name: str) -> float:
    """The sum of every sample called ``name`` on the server's /metrics."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def wait_until(predicate: object, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; True if it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        gevent.sleep(interval)
    return bool(predicate())  # type: ignore[operator]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
