"""A worker started with few file descriptors stays inside them, and if it runs out
anyway it counts and logs the failures instead of printing tracebacks and spinning.

Real gunicorn, one worker, started under ``ulimit -n``; a bounded
flood of keep-alive clients from this process against a slow simulated upstream.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
import requests
from gevent.pool import Group

from simulator.process import SimulatorProcess
from smart.protection.exhaustion import LOG_INTERVAL_S
from tests.support import Gunicorn, scrape_total

#: The worker's descriptor limit, soft and hard: small enough for the flood to exceed.
NOFILE = 256
#: Clients of the flood, each on its own connection: more than the limit.
FLOOD_CONNECTIONS = 400
#: How long the flood lasts; every client stops at its end.
FLOOD_S = 4.0
#: The upstream's answer time: long enough to keep many requests in flight.
UPSTREAM_MS = 500
#: A flooded worker still answers a health check on a new connection within this: the
#: check waits in the listen queue while refused connections make room, one pause
#: (SMART_REFUSAL_PAUSE_MS, 1 s) at a time, on a loaded CI box.
HEALTH_WITHIN_S = 5.0
#: How often the health check is made during the flood.
HEALTH_EVERY_S = 0.5
#: Bound on one socket operation of a flood client.
CLIENT_TIMEOUT_S = 10.0

REQUEST = b"GET /api/smart HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _read_response(sock: socket.socket) -> int:
    """The status of one response read off ``sock`` (Content-Length framed); 0 at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        body += chunk
    return int(head.split(b" ", 2)[1])


def _flood_client(port: int, until: float, statuses: list[int]) -> None:
    """Requests one after the other on a keep-alive connection, reconnecting when it
    closes, until ``until``."""
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as sock:
                while time.monotonic() < until:
                    sock.sendall(REQUEST)
                    status = _read_response(sock)
                    if not status:
                        break
                    statuses.append(status)
        except OSError:
            statuses.append(-1)
            gevent.sleep(0.05)  # a refused connect is retried, not spun on


def _flood(server: Gunicorn) -> tuple[list[int], list[float]]:
    """The flood's statuses and, taken during it, the health checks' answer times
    (``inf`` for a check that failed)."""
    statuses: list[int] = []
    health: list[float] = []
    until = time.monotonic() + FLOOD_S
    clients = Group()
    for _ in range(FLOOD_CONNECTIONS):
        clients.spawn(_flood_client, server.port, until, statuses)
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            ok = requests.get(server.url + "/healthz", timeout=HEALTH_WITHIN_S).status_code == 200
        except requests.RequestException:
            ok = False
        health.append(time.monotonic() - started if ok else float("inf"))
        gevent.sleep(HEALTH_EVERY_S)
    clients.join(timeout=CLIENT_TIMEOUT_S + FLOOD_S)
    clients.kill(timeout=1)
    return statuses, health


def _lines(server: Gunicorn) -> Iterator[str]:
    yield from (line for line in server.stdout + server.stderr if line.strip())


@pytest.fixture
def slow_upstream() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(mode="fixed", fixed_ms=UPSTREAM_MS, failure_rate=0.0) as sim:
        yield sim


def test_a_worker_with_few_descriptors_serves_inside_them_and_answers_health_checks(
    slow_upstream: SimulatorProcess, tmp_path: Path
) -> None:
    env = {"SMART_UPSTREAM_URL": slow_upstream.work_url}
    with Gunicorn(env, workers=1, tmp_path=tmp_path, nofile=NOFILE) as server:
        ready = next(json.loads(line) for line in server.stdout if "worker ready" in line)
        assert ready["capacity"]["descriptors"] == NOFILE
        statuses, health = _flood(server)
        exhausted = scrape_total(server, "smart_descriptors_exhausted_total")
    assert statuses.count(200) > 0
    assert health and max(health) < HEALTH_WITHIN_S, health
    assert exhausted == 0
    for line in _lines(server):
        assert "Too many open files" not in line
        json.loads(line)


def test_a_worker_that_runs_out_of_descriptors_counts_it_and_keeps_serving(
    slow_upstream: SimulatorProcess, tmp_path: Path
) -> None:
    # An operator's limits far past the descriptors: accept and connect fail.
    env = {
        "SMART_UPSTREAM_URL": slow_upstream.work_url,
        "SMART_MAX_IN_FLIGHT": str(FLOOD_CONNECTIONS),
        "SMART_WORKER_CONNECTIONS": str(2 * FLOOD_CONNECTIONS),
    }
    with Gunicorn(env, workers=1, tmp_path=tmp_path, nofile=NOFILE) as server:
        statuses, _ = _flood(server)
        # Once the flood has gone, the worker has its descriptors back and answers.
        assert requests.get(server.url + "/healthz", timeout=HEALTH_WITHIN_S).status_code == 200
        exhausted = scrape_total(server, "smart_descriptors_exhausted_total")
    assert statuses.count(200) > 0
    assert exhausted > 0
    lines = list(_lines(server))
    for line in lines:
        assert "Traceback" not in line
        json.loads(line)
    alarms = [line for line in lines if "out of file descriptors" in line]
    assert 1 <= len(alarms) <= FLOOD_S / LOG_INTERVAL_S + 2
