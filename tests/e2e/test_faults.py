"""Fault injection over real sockets: what smart answers when the upstream misbehaves
in ways a status code cannot express, how fast, and that nothing is left behind.

The per-kind table of failed attempts is in test_service.py; here are the faults that
play out over time (trickling, endless and hanging bodies, restarts, DNS) and the
resources each one must give back: the simulator's connections closed, the worker's
descriptors back to their baseline, no socket stuck in CLOSE_WAIT.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import psutil
import pytest
import requests
from gevent.event import Event
from gevent.pool import Pool

from simulator.process import SimulatorProcess
from smart.lifecycle.runtime import IDLE_SWEEP_INTERVAL_S
from tests.support import Gunicorn, Servers, open_fds, wait_until

#: The contract allows ±40 ms around each due time; a loaded 2-core CI box running
#: gunicorn, the simulator and the tests at once stalls beyond that.
TOLERANCE_S = 0.15
#: The contract: a decided request's leftover attempts are closed within 1 s.
CLOSED_WITHIN_S = 1.0
#: How long giving everything back may take after a test: the contract's second for
#: closing leftovers, plus what a CI box loaded by other test runs adds to it.
SETTLED_WITHIN_S = CLOSED_WITHIN_S * 3
#: Per-attempt limit of the server under test when the client gives no timeout;
#: short, to keep hanging and trickling cases quick.
ATTEMPT_LIMIT_S = 1.0
#: Descriptors a worker may hold above its baseline: idle keep-alive connections to
#: the upstream, kept for reuse, one per attempt that ran concurrently at most.
FD_SLACK = 6
#: The simulator's body is ``{"time": N}``, about a dozen bytes, sent one at a time.
TRICKLE_BYTES = 12


pytestmark = pytest.mark.simulator(mode="fixed", fixed_ms=10, failure_rate=0.0)


@pytest.fixture(scope="module")
def server(simulator: SimulatorProcess, module_servers: Servers) -> Gunicorn:
    env = {
        "SMART_UPSTREAM_URL": simulator.work_url,
        "SMART_ATTEMPT_TIMEOUT_MS": str(int(ATTEMPT_LIMIT_S * 1000)),
        "SMART_DEBUG_ENDPOINTS": "true",
    }
    return module_servers.start(env, workers=1)


@pytest.fixture
def baseline(server: Gunicorn, simulator: SimulatorProcess) -> Iterator[int]:
    """The worker's descriptors before the test; after it, everything is given back."""
    simulator.reset()
    simulator.configure(mode="fixed", fixed_ms=10, failure_rate=0.0)
    get(server)  # one warm pooled connection, as in steady state
    (pid,) = server.worker_pids()
    fds = open_fds(pid)
    yield fds
    assert_nothing_left(server, simulator, pid, fds)


def get(server: Gunicorn, query: str = "", **kwargs: Any) -> requests.Response:
    """One request on a connection of its own, closed by the server after the answer.

    A ``requests`` response holds its keep-alive connection open until it is dropped;
    open client connections would blur the worker's descriptor count and hold its
    shutdown for the keep-alive timeout.
    """
    kwargs.setdefault("timeout", 10)
    kwargs["headers"] = {"Connection": "close", **kwargs.get("headers", {})}
    return requests.get(f"{server.url}/api/smart{query}", **kwargs)


def runtime_state(server: Gunicorn) -> dict[str, Any]:
    state: dict[str, Any] = requests.get(server.url + "/debug/runtime", timeout=10).json()
    return state


def tcp_states(pid: int) -> collections.Counter[str]:
    return collections.Counter(c.status for c in psutil.Process(pid).net_connections("tcp"))


def assert_nothing_left(server: Gunicorn, simulator: SimulatorProcess, pid: int, fds: int) -> None:
    def left() -> dict[str, int]:
        state = runtime_state(server)
        return {
            "upstream calls in flight": simulator.stats()["in_flight"],
            "requests in flight": state["requests_in_flight"],
            "attempts in flight": state["upstream_attempts_in_flight"],
            "descriptors over the slack": max(0, open_fds(pid) - fds - FD_SLACK),
            "CLOSE_WAIT": tcp_states(pid)["CLOSE_WAIT"],
        }

    assert wait_until(lambda: not any(left().values()), SETTLED_WITHIN_S), left()


def calls_of(simulator: SimulatorProcess, request_id: str) -> list[dict[str, Any]]:
    return [c for c in simulator.stats()["recent"] if c["request_id"] == request_id]


def all_closed_by_smart(simulator: SimulatorProcess, request_id: str, count: int) -> bool:
    calls = calls_of(simulator, request_id)
    return len(calls) == count and all(c["client_closed"] for c in calls)


def outcomes(response: requests.Response) -> list[str]:
    return [a["outcome"] for a in response.json()["attempts"]]


# --- slow bodies ---------------------------------------------------------------------


def test_a_body_trickling_in_byte_by_byte_before_the_deadline_is_a_success(
    server: Gunicorn, simulator: SimulatorProcess, baseline: int
) -> None:
    simulator.by_attempt({"1": {"kind": "trickle", "interval_ms": 10}})
    response = get(server, "?timeout=2000")
    assert response.status_code == 200
    assert response.headers["X-Smart-Winner"] == "1"
    assert response.headers["X-Smart-Attempts"] == "1"


def test_a_body_trickling_past_the_deadline_is_a_504_at_the_deadline(
    server: Gunicorn, simulator: SimulatorProcess, baseline: int
) -> None:
    # Every byte arrives well within requests' per-read timeout: only the request's
    # own deadline can end it.
    simulator.by_attempt({str(n): {"kind": "trickle", "interval_ms": 100} for n in (1, 2, 3)})
    response = get(server, "?timeout=500", headers={"X-Request-ID": "trickle-deadline"})
    assert response.status_code == 504
    assert outcomes(response) == ["cancelled"] * 3
    assert 0.5 <= response.elapsed.total_seconds() <= 0.5 + TOLERANCE_S
    assert wait_until(
        lambda: all_closed_by_smart(simulator, "trickle-deadline", 3), CLOSED_WITHIN_S
    )


def test_a_body_trickling_past_the_attempt_limit_without_a_timeout_is_a_504(
    server: Gunicorn, simulator: SimulatorProcess, baseline: int
) -> None:
    interval_ms = ATTEMPT_LIMIT_S * 1000 / TRICKLE_BYTES * 2
    simulator.by_attempt(
        {str(n): {"kind": "trickle", "interval_ms": interval_ms} for n in (1, 2, 3)}
    )
    response = get(server, headers={"X-Request-ID": "trickle-limit"})
    assert response.status_code == 504
    assert outcomes(response) == ["timeout"] * 3
    # Attempt 1 times out at its limit, the hedges at theirs, 300 ms later.
    assert response.elapsed.total_seconds() <= ATTEMPT_LIMIT_S + 0.3 + TOLERANCE_S
    assert wait_until(lambda: all_closed_by_smart(simulator, "trickle-limit", 3), CLOSED_WITHIN_S)


def test_an_endless_body_is_cut_at_the_size_cap_and_its_connection_closed(
    server: Gunicorn, simulator: SimulatorProcess, baseline: int
) -> None:
    simulator.by_attempt({str(n): {"kind": "endless"} for n in (1, 2, 3)})
    response = get(server, "?timeout=5000", headers={"X-Request-ID": "endless"})
    assert response.status_code == 502
    assert outcomes(response) == ["body_too_large"] * 3
    # 16 KiB at the simulator's 1 KiB per 10 ms, then the hedges' 16 KiB.
    assert response.elapsed.total_seconds() < 1.0
    assert wait_until(lambda: all_closed_by_smart(simulator, "endless", 3), CLOSED_WITHIN_S)


def test_an_upstream_that_hangs_after_connecting_is_cut_at_the_attempt_limit(
    server: Gunicorn, simulator: SimulatorProcess, baseline: int
) -> None:
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    response = get(server, headers={"X-Request-ID": "hang"})
    assert response.status_code == 504
    assert outcomes(response) == ["timeout"] * 3
    assert response.elapsed.total_seconds() <= ATTEMPT_LIMIT_S + 0.3 + TOLERANCE_S
    assert wait_until(lambda: all_closed_by_smart(simulator, "hang", 3), CLOSED_WITHIN_S)


# --- broken connections, many times over ----------------------------------------------

BROKEN = ["reset_mid_headers", "reset_mid_body", "garbage", "close", "truncated", "reset"]
#: Requests per kind: enough that a leak of one descriptor per request would show.
REPEATS = 20


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_connections_are_failed_attempts_and_leave_no_socket_behind(
    server: Gunicorn, simulator: SimulatorProcess, baseline: int, kind: str
) -> None:
    simulator.by_attempt({str(n): {"kind": kind} for n in (1, 2, 3)})
    for _ in range(REPEATS):
        response = get(server, "?timeout=2000")
        assert response.status_code == 502
        assert outcomes(response) == ["reset"] * 3


# --- the upstream's address ------------------------------------------------------------


def test_an_upstream_name_that_does_not_resolve_fails_within_the_deadline(tmp_path: Path) -> None:
    # RFC 2606 reserves .invalid: it never resolves, here or anywhere.
    env = {"SMART_UPSTREAM_URL": "http://upstream.invalid:8080/api/work"}
    with Gunicorn(env, workers=1, tmp_path=tmp_path) as srv:
        (pid,) = srv.worker_pids()
        fds = open_fds(pid)
        response = get(srv, "?timeout=3000")
        assert response.elapsed.total_seconds() <= 3 + TOLERANCE_S
        # A resolver that answers "no such name" makes it a prompt 502; one that never
        # answers (no DNS server at all) runs the request into its deadline.
        if response.status_code == 502:
            assert outcomes(response) == ["connect_error"] * 3
        else:
            assert response.status_code == 504
        assert open_fds(pid) <= fds + FD_SLACK


# --- the upstream restarts under load --------------------------------------------------

#: Concurrent clients during the restart test, each sending one request after another.
CLIENTS = 8
#: How long the upstream stays down, and how long the load runs after its return.
DOWN_S = 0.5
RECOVERED_AFTER_S = 1.0


def test_an_upstream_restart_under_load_costs_failed_attempts_then_recovers(
    tmp_path: Path,
) -> None:
    first = SimulatorProcess(mode="fixed", fixed_ms=20, failure_rate=0.0).start()
    port = first.port
    second: SimulatorProcess | None = None
    env = {"SMART_UPSTREAM_URL": first.work_url, "SMART_DEBUG_ENDPOINTS": "true"}
    answers: list[tuple[float, requests.Response]] = []
    stop = Event()

    def client(srv: Gunicorn) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            answers.append((sent, get(srv, "?timeout=2000")))

    try:
        with Gunicorn(env, workers=1, tmp_path=tmp_path) as srv:
            (pid,) = srv.worker_pids()
            load = Pool(CLIENTS)
            for _ in range(CLIENTS):
                load.spawn(client, srv)
            assert wait_until(lambda: len(answers) >= 50, 10)
            pooled = tcp_states(pid)["ESTABLISHED"]
            first.stop()
            gevent.sleep(DOWN_S)  # the outage itself: requests meanwhile fail fast
            second = SimulatorProcess(
                mode="fixed", fixed_ms=20, failure_rate=0.0, port=port
            ).start()
            restarted = time.monotonic()
            assert wait_until(
                lambda: any(t > restarted + RECOVERED_AFTER_S for t, _ in answers), 10
            )
            stop.set()
            assert load.join(timeout=10)

            after = [r for t, r in answers if t > restarted + RECOVERED_AFTER_S]
            assert after and all(r.status_code == 200 for r in after)
            for _, response in answers:
                assert response.status_code in (200, 502), response.text
                if response.status_code == 502:
                    assert set(outcomes(response)) <= {"reset", "connect_error"}
            assert any(r.status_code == 502 for _, r in answers), "the outage was not seen"

            # Connections pooled before the restart are dead; none may stay behind in
            # CLOSE_WAIT, however idle the pool.
            assert wait_until(
                lambda: tcp_states(pid)["CLOSE_WAIT"] == 0, IDLE_SWEEP_INTERVAL_S * 2 + 1
            )
            assert pooled > 0
            assert runtime_state(srv)["upstream_attempts_in_flight"] == 0
    finally:
        first.stop()
        if second is not None:
            second.stop()


#: Requests sent at once to fill smart's pool with that many keep-alive connections.
POOLED = 8


def test_pooled_connections_the_upstream_closed_while_idle_do_not_linger(
    tmp_path: Path,
) -> None:
    # urllib3 notices a dead pooled connection only when it takes it out again: without
    # traffic, each would sit in CLOSE_WAIT for as long as the worker lives.
    first = SimulatorProcess(mode="fixed", fixed_ms=100, failure_rate=0.0).start()
    second: SimulatorProcess | None = None
    env = {"SMART_UPSTREAM_URL": first.work_url}
    try:
        with Gunicorn(env, workers=1, tmp_path=tmp_path) as srv:
            (pid,) = srv.worker_pids()
            burst = Pool(POOLED)
            statuses = [burst.spawn(lambda: get(srv).status_code) for _ in range(POOLED)]
            assert burst.join(timeout=10)
            assert [s.value for s in statuses] == [200] * POOLED
            first.stop()
            assert wait_until(
                lambda: tcp_states(pid)["CLOSE_WAIT"] == 0, IDLE_SWEEP_INTERVAL_S * 2 + 1
            )
            second = SimulatorProcess(
                mode="fixed", fixed_ms=100, failure_rate=0.0, port=first.port
            ).start()
            response = get(srv, "?timeout=2000")
            assert response.status_code == 200
            assert response.headers["X-Smart-Attempts"] == "1"  # no dead connection tried
    finally:
        first.stop()
        if second is not None:
            second.stop()
