"""CPU the simulated upstream spends per ``/api/work`` call, under wrk.

The benchmark runs the simulator on the same cores as smart and wrk, so every
microsecond it spends per call is taken from smart. This starts the simulator alone
(fixed mode, no failures unless asked), drives it with wrk at each number of
connections, and divides the simulator's CPU time (user + system, from ``/proc``) by
the calls it counted. Each point is repeated and the median reported.

``python -m bench.simulator_cost`` measures this checkout; ``--source DIR`` measures
the simulator of another tree (e.g. ``git archive BASE | tar -x -C DIR``), so two
versions can be compared in one session under the same load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from harness.wrk import run_wrk
from simulator.process import SimulatorProcess

ROOT = Path(__file__).resolve().parent.parent
#: Connections are opened and the first calls answered before the count starts.
WARMUP_S = 1.0
#: A run stops at this even if asked for more: the box is shared.
MAX_DURATION_S = 15.0
#: wrk gives up on a request after this; far above any fixed delay measured here.
REQUEST_TIMEOUT_S = 5.0
#: What smart's attempts carry, so the simulator parses and records what it does in
#: the benchmark (the Python requests library's other headers included).
HEADERS = {
    "User-Agent": "python-requests/2.32.3",
    "Accept-Encoding": "gzip, deflate",
    "Accept": "application/json",
    "Connection": "keep-alive",
    "X-Request-ID": "3f2b9c4e8a1d4f6b9e7c2a5d8b1e4f7a",
    "X-Smart-Attempt": "1",
}


def cpu_seconds(pid: int) -> float:
    """User + system time of one process so far, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    cpu_us_per_call: float
    calls_per_s: float
    p50_ms: float
    statuses: dict[str, int]
    socket_errors: int


def measure(
    sim: SimulatorProcess, connections: int, duration_s: float, headers: dict[str, str]
) -> Run:
    """One point: wrk for ``duration_s`` after a warm-up; CPU per call and call rate."""
    assert sim.pid is not None
    run_wrk(sim.work_url, connections, WARMUP_S, REQUEST_TIMEOUT_S, headers)
    sim.reset()
    calls_before, cpu_before = sim.stats()["calls"], cpu_seconds(sim.pid)
    load = run_wrk(sim.work_url, connections, duration_s, REQUEST_TIMEOUT_S, headers)
    cpu = cpu_seconds(sim.pid) - cpu_before
    # The stats request is not a call; its own CPU is well under a millisecond.
    calls = sim.stats()["calls"] - calls_before
    return Run(
        cpu_us_per_call=cpu * 1e6 / calls if calls else float("nan"),
        calls_per_s=calls / duration_s,
        p50_ms=load.percentile(50),
        statuses=load.statuses,
        socket_errors=sum(load.socket_errors.values()),
    )


def report(label: str, connections: int, runs: list[Run]) -> float:
    """Print one line for a point's runs; their median CPU per call."""
    cost = statistics.median(run.cpu_us_per_call for run in runs)
    rate = statistics.median(run.calls_per_s for run in runs)
    each = ", ".join(f"{run.cpu_us_per_call:.0f}" for run in runs)
    p50 = statistics.median(run.p50_ms for run in runs)
    statuses = sum((Counter(run.statuses) for run in runs), Counter[str]())
    socket_errors = sum(run.socket_errors for run in runs)
    print(
        f"{label}, {connections:>3} connections: {cost:4.0f} µs/call median ({each}); "
        f"{rate:4.0f} calls/s, p50 {p50:.1f} ms, statuses {dict(statuses)}, "
        f"{socket_errors} socket errors",
        flush=True,
    )
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        nargs="+",
        default=[ROOT],
        help="trees holding smart/; with several, their runs alternate",
    )
    parser.add_argument("--connections", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mode", choices=("fixed", "random"), default="fixed")
    parser.add_argument("--fixed-ms", type=int, default=100)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument(
        "--close",
        action="store_true",
        help="a new connection per call, as when smart closes cancelled hedges",
    )
    args = parser.parse_args()
    headers = {**HEADERS, "Connection": "close"} if args.close else HEADERS
    duration = min(args.duration, MAX_DURATION_S)
    options: dict[str, object] = {
        "mode": args.mode,
        "fixed_ms": args.fixed_ms,
        "failure_rate": args.failure_rate,
    }
    if args.failure_rate:
        # Failures that answer (no hang, no reset): every call costs a full reply.
        options["failure_kinds"] = ["status_500", "status_503", "status_429", "html"]
    reuse = "a new connection per call" if args.close else "keep-alive"
    print(f"{options}, {reuse}, {duration:g} s per run, {args.repeat} runs per point")
    labels = [str(source) for source in args.source]
    for connections in args.connections:
        runs: dict[str, list[Run]] = {label: [] for label in labels}
        # Alternating the trees spreads whatever else the box does over all of them.
        for _ in range(args.repeat):
            for label, source in zip(labels, args.source, strict=True):
                # Safe path: ``-m`` would otherwise import smart from the working directory.
                env = {"PYTHONPATH": str(source.resolve()), "PYTHONSAFEPATH": "1"}
                # A fresh process per run: no state carried over from the previous one.
                with SimulatorProcess(env=env, **options) as sim:
                    runs[label].append(measure(sim, connections, duration, headers))
                time.sleep(0.5)
        costs = [report(label, connections, runs[label]) for label in labels]
        if len(costs) > 1:
            ratios = ", ".join(f"{costs[0] / cost:.2f}" for cost in costs[1:])
            print(f"first tree's CPU per call over the others': {ratios}")


if __name__ == "__main__":
    main()
