"""``make bench``: smart and the naive baseline under wrk, beside the ideal hedger.

Every point starts from an idle server, warms up, then measures for a fixed time;
the whole run is bounded (about 9 minutes, 4 with ``BENCH_QUICK=1``). Results go to
``bench/results/`` as JSON, a Markdown table and plots.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import ideal, report
from bench.processes import RAW, RESULTS, Server, usage
from harness.wrk import REQUEST_TIMEOUT_S, LoadResult, run_wrk
from simulator.process import SimulatorProcess

#: After wrk stops: long enough for the server to see every client close and finish
#: the requests wrk abandoned (a hung attempt ends at the 3 s attempt limit).
IDLE_S = 4.0
#: Longest wait for the simulator's calls of a stopped server to end.
SETTLE_S = 10.0
#: How often resources are sampled during a point, for the peak.
SAMPLE_EVERY_S = 1.0


@dataclass(frozen=True)
class Plan:
    duration_s: float
    warmup_s: float
    fixed_connections: tuple[int, ...]
    random_connections: tuple[int, ...]
    #: Random mode at few connections runs longer: ~40 answers/s need time for a tail.
    slow_duration_s: float
    tail_connections: tuple[int, ...]
    capacity_connections: int
    capacity_duration_s: float
    #: Fixed mode again with a fixed in-flight cap, the lag limit off: what it buys.
    cap_connections: tuple[int, ...] = (200, 2000)


FULL = Plan(
    duration_s=10,
    warmup_s=2,
    fixed_connections=(10, 50, 200, 500, 2000, 10000),
    random_connections=(10, 50, 500, 2000),
    slow_duration_s=20,
    tail_connections=(10, 50),
    capacity_connections=1500,
    capacity_duration_s=12,
    cap_connections=(200, 500, 2000, 10000),
)
QUICK = Plan(
    # Not shorter: a request unanswered for 5 s must show up as a timeout in its point.
    duration_s=8,
    warmup_s=1,
    fixed_connections=(10, 200, 500, 2000),
    random_connections=(10, 500),
    slow_duration_s=8,
    tail_connections=(50,),
    capacity_connections=1500,
    capacity_duration_s=8,
)


#: Percentiles of the admitted requests' own time (Server-Timing) kept in the results.
SERVED_PERCENTILES = (50, 90, 99, 99.9)


@dataclass
class Point:
    scenario: str
    server: str
    mode: str
    connections: int
    load: LoadResult
    calls_per_request: float
    server_cpu_us_per_request: float
    server_user_us_per_request: float
    server_system_us_per_request: float
    simulator_cpu_us_per_request: float
    wrk_cpu_us_per_request: float
    resources: dict[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["load"]["rps"] = round(self.load.rps, 1)
        out["load"]["goodput"] = round(self.load.goodput, 1)
        # The distribution is summed up: a bucket per millisecond is bulk, not a result.
        del out["load"]["served_ms"]
        out["load"]["served_percentiles_ms"] = {
            f"{p:g}": self.load.served_percentile(p) for p in SERVED_PERCENTILES
        }
        return out


class Sampler(threading.Thread):
    """Peak RSS, descriptors and upstream connections of the server during a point."""

    def __init__(self, pids: list[int], upstream_port: int, simulator: SimulatorProcess):
        super().__init__(daemon=True)
        self.pids, self.port, self.simulator = pids, upstream_port, simulator
        self.stop = threading.Event()
        self.peak: dict[str, int] = {"rss_bytes": 0, "fds": 0, "upstream_connections": 0}
        self.peak_upstream_in_flight = 0

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY_S):
            now = usage(self.pids, self.port)
            for key in self.peak:
                self.peak[key] = max(self.peak[key], getattr(now, key))
            try:
                in_flight = int(self.simulator.stats()["in_flight"])
            except Exception:  # noqa: BLE001 - a missed sample is only a missed sample
                continue
            self.peak_upstream_in_flight = max(self.peak_upstream_in_flight, in_flight)


def first_attempts(stats: dict[str, Any]) -> int | None:
    by_attempt = stats.get("calls_by_attempt")
    return None if by_attempt is None else int(by_attempt.get("1", 0))


def measure(
    scenario: str,
    server: Server,
    simulator: SimulatorProcess,
    mode: str,
    connections: int,
    duration_s: float,
    warmup_s: float,
    query: str = "",
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> Point:
    url = server.url + "/api/smart" + query
    if warmup_s:
        run_wrk(url, connections, warmup_s)
        time.sleep(1.0)
    pids, sim_pid = server.pids(), simulator.pid
    assert sim_pid is not None
    before = usage(pids, simulator.port)
    sim_before = usage([sim_pid])
    stats_before = simulator.stats()
    sampler = Sampler(pids, simulator.port, simulator)
    sampler.start()
    load = run_wrk(url, connections, duration_s, timeout_s)
    sampler.stop.set()
    after = usage(pids, simulator.port)
    sim_after = usage([sim_pid])
    time.sleep(IDLE_S)
    idle = usage(pids, simulator.port)
    stats_after = simulator.stats()
    calls = stats_after["calls"] - stats_before["calls"]
    firsts = first_attempts(stats_after)
    if firsts is not None:
        # Exact: requests wrk abandoned at the end still reached the upstream.
        requests_upstream = firsts - (first_attempts(stats_before) or 0)
    else:
        requests_upstream = sum(
            n for status, n in load.statuses.items() if status not in ("400", "503")
        )
    n = max(1, load.requests)
    sampler.join(timeout=5)
    peak = sampler.peak
    point = Point(
        scenario=scenario,
        server=server.kind,
        mode=mode,
        connections=connections,
        load=load,
        calls_per_request=round(calls / requests_upstream, 4) if requests_upstream else 0.0,
        server_cpu_us_per_request=round((after.cpu_s - before.cpu_s) / n * 1e6, 1),
        server_user_us_per_request=round((after.user_s - before.user_s) / n * 1e6, 1),
        server_system_us_per_request=round((after.system_s - before.system_s) / n * 1e6, 1),
        simulator_cpu_us_per_request=round((sim_after.cpu_s - sim_before.cpu_s) / n * 1e6, 1),
        wrk_cpu_us_per_request=round(load.wrk_cpu_s / n * 1e6, 1),
        resources={
            "before": before.as_dict(),
            "peak": {
                "rss_mib": round(peak["rss_bytes"] / 2**20, 1),
                "fds": peak["fds"],
                "upstream_connections": peak["upstream_connections"],
                "upstream_in_flight": sampler.peak_upstream_in_flight,
            },
            "after": after.as_dict(),
            "after_idle": idle.as_dict(),
        },
    )
    print(summary_line(point), flush=True)
    return point


def summary_line(p: Point) -> str:
    lat = p.load
    return (
        f"{p.scenario:>9} {p.server:>6} {p.mode:>6} c={p.connections:<6} "
        f"rps={lat.rps:8.1f} good={lat.goodput:8.1f} p50={lat.percentile(50):7.1f} "
        f"p99={lat.percentile(99):7.1f} max={lat.latency_ms['max']:7.1f} "
        f"served p50/p99={lat.served_percentile(50)}/{lat.served_percentile(99)} "
        f"st={lat.statuses} err={ {k: v for k, v in lat.socket_errors.items() if v} } "
        f"calls/req={p.calls_per_request:.3f} cpu/req={p.server_cpu_us_per_request:.0f}us"
    )


SIM_MODES: dict[str, dict[str, object]] = {
    "fixed": {"mode": "fixed", "fixed_ms": 100, "failure_rate": 0.0},
    "random": {"mode": "random", "min_ms": 100, "max_ms": 600, "failure_rate": 0.2},
    "slow": {"mode": "fixed", "fixed_ms": 5000, "failure_rate": 0.0},
}


@contextmanager
def serving(kind: str, simulator: SimulatorProcess, env: dict[str, str]) -> Iterator[Server]:
    env = {"SMART_UPSTREAM_URL": simulator.work_url, **env}
    with Server(kind, env, kind) as server:
        yield server
    settle(simulator)


def settle(simulator: SimulatorProcess) -> None:
    """Wait (bounded) for the simulator to finish the calls a stopped server left behind,
    so one server's leftovers do not slow the next one's first point."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline and simulator.stats()["in_flight"] > 0:
        time.sleep(0.2)


def run(plan: Plan, only: set[str] | None) -> list[Point]:
    points: list[Point] = []
    want = (lambda name: True) if not only else (lambda name: name in only)
    with SimulatorProcess(**SIM_MODES["fixed"]) as simulator:
        for mode, conns in (("fixed", plan.fixed_connections), ("random", plan.random_connections)):
            if not want(mode):
                continue
            simulator.configure(**SIM_MODES[mode])
            for kind in ("smart", "naive"):
                with serving(kind, simulator, {}) as server:
                    for c in conns:
                        slow = mode == "random" and c <= 10
                        duration = plan.slow_duration_s if slow else plan.duration_s
                        points.append(
                            measure(mode, server, simulator, mode, c, duration, plan.warmup_s)
                        )
        if want("tail"):
            simulator.configure(**SIM_MODES["random"])
            with serving("smart", simulator, {"SMART_HEDGE_FANOUT": "0"}) as server:
                server.kind = "smart"
                for c in plan.tail_connections:
                    duration = plan.slow_duration_s if c <= 10 else plan.duration_s
                    p = measure("unhedged", server, simulator, "random", c, duration, plan.warmup_s)
                    points.append(p)
        if want("cap"):
            simulator.configure(**SIM_MODES["fixed"])
            env = {"SMART_LOOP_LAG_TARGET_MS": "0"}
            with serving("smart", simulator, env) as server:
                for c in plan.cap_connections:
                    points.append(
                        measure(
                            "cap", server, simulator, "fixed", c, plan.duration_s, plan.warmup_s
                        )
                    )
        if only and "inflight" in only:
            # Not in the default plan: how the per-worker cap trades 503s for hedges.
            simulator.configure(**SIM_MODES["fixed"])
            for cap in (64, 128, 256, 512):
                env = {"SMART_MAX_IN_FLIGHT": str(cap), "SMART_LOOP_LAG_TARGET_MS": "0"}
                with serving("smart", simulator, env) as server:
                    for c in (200, 2000):
                        p = measure(f"cap{cap}", server, simulator, "fixed", c, 8, plan.warmup_s)
                        points.append(p)
        if want("capacity"):
            simulator.configure(**SIM_MODES["slow"])
            with serving("smart", simulator, {}) as server:
                p = measure(
                    "capacity",
                    server,
                    simulator,
                    "slow",
                    plan.capacity_connections,
                    plan.capacity_duration_s,
                    0,
                    # Beyond the 3 s attempt limit: only a client's deadline lets a 5 s
                    # upstream answer count.
                    query="?timeout=10000",
                    timeout_s=15,
                )
                points.append(p)
    return points


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg(),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("BENCH_QUICK")))
    parser.add_argument(
        "--only", help="comma-separated: fixed,random,tail,capacity,cap (and inflight: a cap sweep)"
    )
    parser.add_argument("--out", default=str(RESULTS), help="where results are written")
    args = parser.parse_args()
    # bench.sh's time limit sends SIGTERM: unwind, so every process started here is
    # stopped by the context managers that started it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    RAW.mkdir(parents=True, exist_ok=True)
    _raise_open_files_limit()
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    info = machine()
    points = run(plan, set(args.only.split(",")) if args.only else None)
    info["load_average_at_end"] = os.getloadavg()
    info["wall_s"] = round(time.monotonic() - started, 1)
    results = {
        "machine": info,
        "plan": asdict(plan),
        "quick": args.quick,
        "ideal": {
            "fixed": ideal.fixed().summary(),
            "random": ideal.hedged().summary(),
            "random_unhedged": ideal.hedged(policy=ideal.Policy(fanout=0)).summary(),
        },
        "points": [p.as_dict() for p in points],
    }
    report.write(results, Path(args.out))
    print(f"done in {info['wall_s']} s; results in {args.out}")
    return 0


def _raise_open_files_limit() -> None:
    # 10,000 client connections, plus upstream ones: wrk and each worker need that many
    # descriptors. Children inherit the limit.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    raise SystemExit(main())
