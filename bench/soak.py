"""`make soak`: a long, bounded run of mixed traffic, then a check that nothing leaked.

smart (two gunicorn workers) runs in front of the simulator with failures and hangs;
clients send successes, short deadlines, requests without timeout, invalid requests
and hang up mid-request. Every ``--every`` seconds one JSON line per worker reports
its descriptors, RSS, CLOSE_WAIT sockets, greenlets and what is in flight. After the
run and an idle period the workers must be back to their post-warm-up baseline;
the exit status says whether they were. Everything listens on 127.0.0.1.
"""

# ruff: noqa: E402  (gevent must patch the standard library before requests is imported)
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import collections
import json
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import psutil
import requests
from gevent.event import Event
from gevent.pool import Pool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.gunicorn import Gunicorn
from simulator.process import SimulatorProcess
from tests.support import open_fds

#: Allowed after the idle period, against the post-warm-up baseline (reasons as in
#: tests/e2e/test_leaks.py): the idle upstream pool's descriptors, allocator noise in RSS.
FD_SLACK = 100
RSS_SLACK_BYTES = 32 * 1024 * 1024
GREENLET_SLACK = 2
#: The idle period: the slowest request (a hang without timeout) and two sweeps of
#: idle upstream connections.
IDLE_S = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    args = parser.parse_args()

    with SimulatorProcess(mode="random", min_ms=20, max_ms=400, failure_rate=0.2) as simulator:
        env = {
            "SMART_UPSTREAM_URL": simulator.work_url,
            "SMART_ATTEMPT_TIMEOUT_MS": "1000",
            "SMART_DEBUG_ENDPOINTS": "true",
            "SMART_LOG_REQUESTS": "false",
        }
        with Gunicorn(env, workers=2) as server:
            return soak(server, simulator, args.duration, args.concurrency, args.every)


def soak(
    server: Gunicorn, simulator: SimulatorProcess, duration: float, concurrency: int, every: float
) -> int:
    pids = server.worker_pids()
    fresh = sample(server, pids)
    run_load(server, concurrency, seconds=min(30.0, duration / 10), every=None)
    gevent.sleep(IDLE_S)
    baseline = sample(server, pids)
    report("baseline", baseline)
    statuses = run_load(server, concurrency, seconds=duration, every=every)
    report("load done", sample(server, pids), statuses=dict(statuses))
    gevent.sleep(IDLE_S)
    final = sample(server, pids)
    report("after idle", final, upstream_in_flight=simulator.stats()["in_flight"])

    leaks = []
    for pid in pids:
        before, after = baseline[pid], final[pid]
        checks = {
            "fds": after["fds"] <= before["fds"] + FD_SLACK,
            "rss": after["rss"] <= before["rss"] + RSS_SLACK_BYTES,
            "close_wait": after["close_wait"] == 0,
            "greenlets": after["greenlets"] <= fresh[pid]["greenlets"] + GREENLET_SLACK,
            "requests_in_flight": after["requests_in_flight"] == 0,
            "upstream_attempts_in_flight": after["upstream_attempts_in_flight"] == 0,
        }
        leaks += [f"worker {pid}: {name}" for name, ok in checks.items() if not ok]
    print(json.dumps({"event": "verdict", "leaks": leaks}), flush=True)
    return 1 if leaks else 0


def run_load(
    server: Gunicorn, concurrency: int, seconds: float, every: float | None
) -> collections.Counter[int]:
    statuses: collections.Counter[int] = collections.Counter()
    stop = Event()
    pids = server.worker_pids()
    kinds = request_kinds(server)

    def client(number: int) -> None:
        n = number
        while not stop.is_set():
            statuses[kinds[n % len(kinds)]()] += 1
            n += concurrency

    pool = Pool(concurrency)
    for number in range(concurrency):
        pool.spawn(client, number)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        stop.wait(min(left, every or left))
        if every is not None and time.monotonic() < deadline:
            report("sample", sample(server, pids), statuses=dict(statuses))
    stop.set()
    pool.join(timeout=30)
    return statuses


def request_kinds(server: Gunicorn) -> list[Callable[[], int]]:
    def get(query: str) -> int:
        url = f"{server.url}/api/smart{query}"
        try:
            return requests.get(url, timeout=30, headers={"Connection": "close"}).status_code
        except requests.RequestException:
            return -1

    return [
        lambda: get("?timeout=2000"),
        lambda: get("?timeout=150"),
        lambda: get(""),
        lambda: get("?timeout=1000"),
        lambda: get("?timeout=abc"),
        lambda: hang_up(server),
    ]


def hang_up(server: Gunicorn) -> int:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /api/smart?timeout=500 HTTP/1.1\r\nHost: smart\r\n\r\n")
        gevent.sleep(0.05)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return 0


def sample(server: Gunicorn, pids: list[int]) -> dict[int, dict[str, Any]]:
    states: dict[int, dict[str, Any]] = {}
    for _ in range(200):
        state = requests.get(
            server.url + "/debug/runtime", timeout=30, headers={"Connection": "close"}
        ).json()
        states[state["pid"]] = state
        if set(states) >= set(pids):
            break
    for pid in pids:
        process = psutil.Process(pid)
        states[pid].update(
            fds=open_fds(pid),
            rss=process.memory_info().rss,
            close_wait=sum(
                1 for c in process.net_connections("tcp") if c.status == psutil.CONN_CLOSE_WAIT
            ),
        )
    return states


def report(event: str, states: dict[int, dict[str, Any]], **extra: Any) -> None:
    line = {"event": event, "t": round(time.monotonic(), 1), "workers": states, **extra}
    print(json.dumps(line, default=str), flush=True)


if __name__ == "__main__":
    sys.exit(main())
