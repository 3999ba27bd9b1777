"""Nothing leaks: after a few thousand mixed requests and an idle period, every worker
is back to its baseline.

The mix has successes, hedges rescuing failed attempts, deadlines cutting attempts,
upstream failures on every attempt, hangs, invalid requests and clients that hang up
mid-request. Checked per worker: descriptors, upstream sockets (none in CLOSE_WAIT),
RSS, requests and upstream attempts in flight, and live greenlets.
"""

from __future__ import annotations

import collections
import socket
import struct
from collections.abc import Callable
from typing import Any

import gevent
import psutil
import pytest
import requests
from gevent.pool import Pool

from simulator.process import SimulatorProcess
from smart.lifecycle.runtime import IDLE_SWEEP_INTERVAL_S
from tests.support import Gunicorn, Servers, open_fds, wait_until

#: Requests in the measured run, and in the warm-up before the baseline: enough for
#: pools, caches and the allocator to reach their steady state first.
REQUESTS = 2400
WARMUP = 300
CONCURRENCY = 24
#: Per-attempt limit when the client gives no timeout; short, so hangs end quickly.
ATTEMPT_LIMIT_MS = 600
#: Nothing may be left once the slowest request of the mix (a hang without timeout,
#: ~0.9 s) and the idle-connection sweep are over.
SETTLE_S = 2 * IDLE_SWEEP_INTERVAL_S + 3.0
#: Descriptors above the baseline besides the idle keep-alive connections the upstream
#: pool keeps for reuse (those are counted exactly): a few closing at the moment of
#: the count. The pool keeps one per attempt that ran at once, which the abandoned
#: requests of the mix (they run on after their client left) push past 3 x CONCURRENCY.
FD_SLACK = 8
#: RSS growth allowed over the measured run. A leak of one small object per request
#: would not show in RSS; one of a socket, a greenlet or a response (~10 KiB and more
#: each) would pass this several times over.
RSS_SLACK_BYTES = 12 * 1024 * 1024
#: Greenlets above those of a fresh worker: none should remain; a couple may be in
#: the middle of ending when counted.
GREENLET_SLACK = 2


pytestmark = pytest.mark.simulator(mode="random", min_ms=5, max_ms=80, failure_rate=0.3, seed=11)


@pytest.fixture(scope="module")
def server(simulator: SimulatorProcess, module_servers: Servers) -> Gunicorn:
    env = {
        "SMART_UPSTREAM_URL": simulator.work_url,
        "SMART_ATTEMPT_TIMEOUT_MS": str(ATTEMPT_LIMIT_MS),
        "SMART_DEBUG_ENDPOINTS": "true",
        "SMART_LOG_REQUESTS": "false",
    }
    return module_servers.start(env, workers=2)


def get(server: Gunicorn, query: str) -> int:
    response = requests.get(
        f"{server.url}/api/smart{query}", timeout=10, headers={"Connection": "close"}
    )
    return response.status_code


def hang_up_mid_request(server: Gunicorn, after_s: float, reset: bool) -> int:
    """Send a request and leave before the answer, with a FIN or an RST."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET /api/smart?timeout=400 HTTP/1.1\r\nHost: smart\r\n\r\n")
    gevent.sleep(after_s)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return 0


def mixed(server: Gunicorn, n: int) -> Callable[[], int]:
    kinds: list[Callable[[], int]] = [
        lambda: get(server, "?timeout=2000"),  # successes; hedges rescue the failures
        lambda: get(server, "?timeout=40"),  # deadlines cut slow attempts: 504s
        lambda: get(server, ""),  # no timeout: hangs end at the attempt limit
        lambda: get(server, "?timeout=2000&x=1"),
        lambda: get(server, "?timeout=abc"),  # 400, no upstream call
        lambda: hang_up_mid_request(server, 0.01 * (n % 7), reset=n % 2 == 0),
    ]
    return kinds[n % len(kinds)]


def run_mix(server: Gunicorn, count: int, offset: int = 0) -> collections.Counter[int]:
    pool = Pool(CONCURRENCY)
    jobs = [pool.spawn(mixed(server, offset + n)) for n in range(count)]
    assert pool.join(timeout=180), "the load did not finish"
    return collections.Counter(job.get() for job in jobs)


def worker_state(server: Gunicorn, pids: list[int]) -> dict[int, dict[str, Any]]:
    """/debug/runtime of every worker (each request lands on whichever accepts it)."""
    states: dict[int, dict[str, Any]] = {}
    for _ in range(200):
        state = requests.get(
            server.url + "/debug/runtime", timeout=10, headers={"Connection": "close"}
        ).json()
        states[state["pid"]] = state
        if set(states) == set(pids):
            return states
    raise AssertionError(f"not every worker answered: {sorted(states)} of {pids}")


def snapshot(server: Gunicorn, pids: list[int]) -> dict[int, dict[str, Any]]:
    states = worker_state(server, pids)
    for pid in pids:
        process = psutil.Process(pid)
        states[pid]["fds"] = open_fds(pid)
        states[pid]["rss"] = process.memory_info().rss
        states[pid]["close_wait"] = sum(
            1 for c in process.net_connections("tcp") if c.status == psutil.CONN_CLOSE_WAIT
        )
    return states


def test_thousands_of_mixed_requests_and_an_idle_period_leave_every_worker_at_its_baseline(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    pids = server.worker_pids()
    fresh = snapshot(server, pids)  # greenlets: the hub, the main one, the sweeper...
    run_mix(server, WARMUP)
    assert wait_until(lambda: simulator.stats()["in_flight"] == 0, SETTLE_S)
    before = snapshot(server, pids)  # descriptors and RSS: with pools and caches warm

    statuses = run_mix(server, REQUESTS, offset=WARMUP)
    # Every kind of answer happened: the mix is what it claims to be.
    assert {200, 400, 502, 504} <= set(statuses), statuses
    assert statuses[0] == REQUESTS // 6  # the clients that hung up

    def settled() -> bool:
        after = snapshot(server, pids)
        return simulator.stats()["in_flight"] == 0 and all(
            after[pid]["requests_in_flight"] == 0
            and after[pid]["upstream_attempts_in_flight"] == 0
            and after[pid]["close_wait"] == 0
            and after[pid]["fds"]
            <= before[pid]["fds"] + pooled_growth(before, after, pid) + FD_SLACK
            and after[pid]["greenlets"] <= fresh[pid]["greenlets"] + GREENLET_SLACK
            for pid in pids
        )

    assert wait_until(settled, SETTLE_S, interval=0.5), (fresh, before, snapshot(server, pids))
    after = snapshot(server, pids)
    for pid in pids:
        assert after[pid]["rss"] <= before[pid]["rss"] + RSS_SLACK_BYTES, (before, after)
    # Every connection the upstream still has open is one a worker keeps for reuse.
    pooled = sum(after[pid]["upstream_idle_connections"] for pid in pids)
    assert simulator.stats()["connections_open"] <= pooled + FD_SLACK, (pooled, after)


def pooled_growth(before: dict[int, Any], after: dict[int, Any], pid: int) -> int:
    growth: int = after[pid]["upstream_idle_connections"] - before[pid]["upstream_idle_connections"]
    return max(0, growth)
