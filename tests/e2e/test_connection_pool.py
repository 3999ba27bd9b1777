"""The upstream connection pool over real sockets: reuse, the idle sweep, new connections.

Keep-alive reuse is most of an attempt's cost saving, so what could silently defeat it
is checked here against the real simulator.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import gevent
import pytest

from simulator import SimulatorProcess
from smart.config import Settings
from smart.upstream.client import UpstreamClient

#: Attempts run at once to put that many connections in the pool.
PARALLEL = 4


@pytest.fixture
def client(simulator: SimulatorProcess) -> Iterator[UpstreamClient]:
    simulator.reset()
    upstream = UpstreamClient(Settings(upstream_url=simulator.work_url))
    yield upstream
    upstream.close()


def attempts(client: UpstreamClient, count: int) -> None:
    jobs = [
        gevent.spawn(client.fetch_once, n, time.monotonic(), f"rid-{n}", 5.0) for n in range(count)
    ]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert all(job.value.ok for job in jobs)


def test_the_idle_sweep_keeps_healthy_connections_for_reuse(
    simulator: SimulatorProcess, client: UpstreamClient
) -> None:
    attempts(client, PARALLEL)
    assert client.idle_connections() == PARALLEL
    opened = simulator.stats()["connections_total"]
    assert client.close_dropped_idle() == 0
    assert client.idle_connections() == PARALLEL
    attempts(client, PARALLEL)
    # Every attempt reused a pooled connection: the one new connection is the stats
    # request's own.
    assert simulator.stats()["connections_total"] == opened + 1


def test_the_idle_sweep_closes_connections_the_upstream_dropped() -> None:
    simulator = SimulatorProcess(mode="fixed", fixed_ms=20, failure_rate=0.0).start()
    client = UpstreamClient(Settings(upstream_url=simulator.work_url))
    try:
        attempts(client, PARALLEL)
        simulator.stop()  # the upstream's FINs reach every idle pooled connection
        deadline = time.monotonic() + 5
        closed = 0
        while closed < PARALLEL and time.monotonic() < deadline:
            gevent.sleep(0.05)
            closed += client.close_dropped_idle()
        assert closed == PARALLEL
        assert client.idle_connections() == 0
    finally:
        simulator.stop()
        client.close()
