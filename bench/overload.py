"""Small overload measurements behind docs/OVERLOAD.md, one worker against the simulator.

    python bench/overload.py refusal   # CPU a worker spends per 503, per /healthz
    python bench/overload.py hedges    # self-inflicted hedges as concurrency grows

``SMART_*`` variables of the caller configure the worker under test, e.g.
``SMART_HEDGE_BUDGET_RATIO=0.1 python bench/overload.py hedges``.

Needs ``wrk`` on the PATH. Everything listens on 127.0.0.1; each run is a few seconds
per point, so the numbers are indicative: `make bench` produces the real ones.
"""

# ruff: noqa: E402  (gevent must patch the standard library before requests is imported)
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import collections
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import gevent
import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.gunicorn import Gunicorn
from harness.wrk import run_wrk
from simulator.process import SimulatorProcess

DURATION_S = 5
PROBE_INTERVAL_S = 0.1


def wrk(url: str, connections: int, duration_s: int = DURATION_S) -> dict[str, float]:
    load = run_wrk(url, connections, duration_s)
    return {
        "requests": load.requests,
        "non_2xx": load.requests - sum(n for s, n in load.statuses.items() if s.startswith("2")),
        "p50_ms": load.percentile(50),
        "p99_ms": load.percentile(99),
    }


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def refusal() -> None:
    """A worker whose one slot is taken answers everything else with 503."""
    with SimulatorProcess(mode="fixed", fixed_ms=0, failure_rate=0.0) as sim:
        sim.by_attempt({"1": {"kind": "hang"}})
        for log_requests in ("true", "false"):
            env = {
                "SMART_UPSTREAM_URL": sim.work_url,
                "SMART_MAX_IN_FLIGHT": "1",
                "SMART_HEDGE_FANOUT": "0",
                "SMART_LOG_REQUESTS": log_requests,
                # The cost of one refusal, not its pacing: no pause after a 503.
                "SMART_REFUSAL_PAUSE_MS": "0",
                "SMART_LOOP_LAG_TARGET_MS": "0",
            }
            with Gunicorn(env, workers=1) as server:
                (pid,) = server.worker_pids()
                holder = gevent.spawn(requests.get, server.url + "/api/smart?timeout=60000")
                gevent.sleep(0.5)
                for path in ("/api/smart", "/healthz"):
                    before = cpu_s(pid)
                    result = wrk(server.url + path, 20)
                    used = cpu_s(pid) - before
                    print(
                        f"{path:<11} log_requests={log_requests:<5} "
                        f"{result['requests'] / DURATION_S:7.0f} answers/s "
                        f"({result['non_2xx']} non-2xx), "
                        f"{used / result['requests'] * 1e6:5.0f} us of worker CPU each"
                    )
                holder.kill()


def hedges(levels: list[int], upstream_ms: int) -> None:
    """Closed-loop load below the hedge delay: every hedge at the delay is smart's own."""
    with SimulatorProcess(mode="fixed", fixed_ms=upstream_ms, failure_rate=0.0) as sim:
        env = {
            "SMART_UPSTREAM_URL": sim.work_url,
            "SMART_LOG_REQUESTS": "false",
            "SMART_LOOP_LAG_TARGET_MS": "0",
        }
        # SMART_* settings of the caller apply (e.g. SMART_HEDGE_BUDGET_RATIO=0.1).
        env.update({k: v for k, v in os.environ.items() if k.startswith("SMART_")})
        with Gunicorn(env, workers=1) as server:
            (pid,) = server.worker_pids()
            for connections in levels:
                sim.reset()
                lags: list[float] = []
                probing = gevent.spawn(probe_health, server.url, lags)
                before = cpu_s(pid)
                result = wrk(server.url + "/api/smart", connections)
                used = cpu_s(pid) - before
                probing.kill()
                by_attempt = collections.Counter(c["attempt"] for c in sim.stats()["recent"])
                share = 1 - by_attempt["1"] / max(1, sum(by_attempt.values()))
                print(
                    f"c={connections:<4} {result['requests'] / DURATION_S:6.0f} answers/s, "
                    f"{(result['requests'] - result['non_2xx']) / DURATION_S:6.0f} of them 200  "
                    f"p50 {result.get('p50_ms', 0):6.0f} ms  "
                    f"p99 {result.get('p99_ms', 0):6.0f} ms  "
                    f"hedged attempts {share:4.0%}  "
                    f"/healthz p50 {statistics.median(lags):5.0f} ms  "
                    f"worker CPU {used / result['requests'] * 1000:4.1f} ms per answer"
                )


def probe_health(url: str, into: list[float]) -> None:
    while True:
        started = time.monotonic()
        requests.get(url + "/healthz", timeout=30, headers={"Connection": "close"})
        into.append((time.monotonic() - started) * 1000)
        gevent.sleep(PROBE_INTERVAL_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["refusal", "hedges"])
    parser.add_argument("--levels", default="50,100,150,200")
    parser.add_argument("--upstream-ms", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not on the PATH")
    if args.what == "refusal":
        refusal()
    else:
        hedges([int(n) for n in args.levels.split(",")], args.upstream_ms)


if __name__ == "__main__":
    main()
