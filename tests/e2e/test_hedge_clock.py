"""The hedge clock measures the upstream, not the worker: real sockets, real simulator.

A worker whose loop is busy reads an upstream answer late. The hedger must not take
that for a slow upstream. Here the test itself is the busy worker: it blocks the
process (the kernel's sleep, not gevent's) while the answer arrives.
"""

from __future__ import annotations

import socket
import time

import gevent
import pytest
from gevent.monkey import get_original
from gevent.pool import Pool

from simulator import SimulatorProcess
from smart.config import Settings
from smart.hedging.hedge import HedgePolicy, HedgeResult, hedge
from smart.upstream.client import UpstreamClient
from smart.upstream.exchange import held_by_worker

#: The simulator's fixed latency: well inside the hedge delay.
UPSTREAM_MS = 100
HEDGE_DELAY_S = 0.3
#: How long the "busy worker" holds the loop: past the hedge delay with a margin a
#: loaded machine cannot eat (the answer is due 0.1 s after the send).
BUSY_S = 0.6
#: A bound on anything that should happen at once.
PROMPTLY_S = 5.0

blocking_sleep = get_original("time", "sleep")

pytestmark = pytest.mark.simulator(mode="fixed", fixed_ms=UPSTREAM_MS, failure_rate=0.0)

#: The tests against the simulator run over plain HTTP and over TLS, where
#: ``held_by_worker`` polls the raw socket under the TLS layer.
OVER_HTTP_AND_HTTPS = pytest.mark.parametrize(
    "simulator", [{}, {"tls": True}], ids=["http", "https"], indirect=True, scope="module"
)


def client_of(simulator: SimulatorProcess) -> UpstreamClient:
    """A client of the simulator, trusting the run's CA when it serves HTTPS."""
    return UpstreamClient(
        Settings(upstream_url=simulator.work_url, upstream_ca_bundle=simulator.ca_path)
    )


def wait_for_calls(simulator: SimulatorProcess, in_flight: int) -> None:
    deadline = time.monotonic() + PROMPTLY_S
    while simulator.stats()["in_flight"] < in_flight:
        assert time.monotonic() < deadline, "attempt 1 never reached the simulator"
        gevent.sleep(0.005)


@OVER_HTTP_AND_HTTPS
def test_an_answer_that_arrived_while_the_worker_was_busy_is_not_hedged(
    simulator: SimulatorProcess,
) -> None:
    simulator.reset()
    client = client_of(simulator)
    try:
        runner = gevent.spawn(
            hedge,
            lambda number, t0: client.fetch_once(number, t0, "rid-busy", limit_s=5.0),
            HedgePolicy(delay_s=HEDGE_DELAY_S, fanout=2, held_by_worker=client.held_by_worker),
            pool=Pool(10),
            deadline_s=None,
        )
        wait_for_calls(simulator, 1)
        blocking_sleep(BUSY_S)  # the answer arrives meanwhile; the hedge timer expires
        result = runner.get(timeout=PROMPTLY_S)
    finally:
        client.close()
    assert isinstance(result, HedgeResult)
    assert result.attempts_started == 1
    assert result.trigger is None
    assert simulator.stats()["calls"] == 1


@OVER_HTTP_AND_HTTPS
def test_a_slow_upstream_is_still_hedged_at_the_delay(simulator: SimulatorProcess) -> None:
    simulator.reset()
    simulator.by_attempt({1: {"kind": "ok", "delay_ms": 2000}})
    client = client_of(simulator)
    try:
        started = time.monotonic()
        result = hedge(
            lambda number, t0: client.fetch_once(number, t0, "rid-slow", limit_s=5.0),
            HedgePolicy(delay_s=HEDGE_DELAY_S, fanout=2, held_by_worker=client.held_by_worker),
            pool=Pool(10),
            deadline_s=None,
        )
        took = time.monotonic() - started
    finally:
        client.close()
    assert result.attempts_started == 3
    assert result.winner is not None and result.winner.attempt in (2, 3)
    assert took < 2.0  # the hedges answered, not the slow attempt 1


def test_an_answer_that_arrived_unread_holds_the_attempt_for_the_worker() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = UpstreamClient(Settings(upstream_url=f"http://127.0.0.1:{port}/api/work"))
    try:
        attempt = gevent.spawn(client.fetch_once, 1, time.monotonic(), "rid-raw", 5.0)
        conn, _ = listener.accept()  # cooperative: the attempt connects meanwhile
        with conn:
            conn.recv(4096)  # the request: the attempt now waits in getresponse
            gevent.sleep(0.01)
            assert not held_by_worker(attempt)  # waiting on the upstream to answer
            body = b'{"time": 7}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            # No yield since the send: the attempt has not run, the bytes wait for it.
            assert held_by_worker(attempt)
            outcome = attempt.get(timeout=PROMPTLY_S)
        assert outcome.ok
        assert not held_by_worker(attempt)  # finished: nothing is awaited any more
    finally:
        client.close()
        listener.close()


def test_a_connection_the_upstream_has_not_accepted_is_the_upstreams_time() -> None:
    # A listener whose backlog is full drops further SYNs: the connect waits on it.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    client = UpstreamClient(
        Settings(upstream_url=f"http://127.0.0.1:{port}/api/work", connect_timeout_ms=3000)
    )
    try:
        for _ in range(4):  # more than enough to fill a backlog of 0 (Linux allows 1)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        gevent.sleep(0.05)
        attempt = gevent.spawn(client.fetch_once, 1, time.monotonic(), "rid-syn", 5.0)
        gevent.sleep(0.1)
        assert not attempt.ready()
        assert not held_by_worker(attempt)
        attempt.kill()
    finally:
        client.close()
        for filler in fillers:
            filler.close()
        listener.close()


def test_a_tls_handshake_the_upstream_does_not_answer_is_the_upstreams_time() -> None:
    # Connected at the TCP level (the socket is writable), waiting for a ServerHello
    # that never comes: that wait is the upstream's, and must not hold off the hedges.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = UpstreamClient(Settings(upstream_url=f"https://127.0.0.1:{port}/api/work"))
    try:
        attempt = gevent.spawn(client.fetch_once, 1, time.monotonic(), "rid-tls", 5.0)
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)  # the ClientHello: the attempt now waits in the handshake
            gevent.sleep(0.05)
            assert not attempt.ready()
            assert not held_by_worker(attempt)
            attempt.kill()
    finally:
        client.close()
        listener.close()
