"""``make bench``'s capacity matrix: how many concurrent requests smart holds, by upstream.

Upstream {fixed 100 ms, fixed 2 s, fixed 5 s, random 100-600 ms with 20% failures,
random with 20% hangs} x wrk connections {200, 2,000, 10,000}, 2 workers, closed
loop: goodput against the ideal (connections / mean latency, capped by what the
workers' CPU sustains), 503s, socket errors, CPU, descriptors and memory per request
in flight, and what ran out first. A few points run again with the old fixed limits
(``SMART_MAX_IN_FLIGHT=256``) for a before/after in the same run. Bounded: about
5 minutes, 3 with ``--quick``. Results: ``bench/results/capacity.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import sys
import time
import timeit
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import ideal
from bench.processes import RAW, RESULTS
from bench.run import Point, measure, serving
from simulator.process import SimulatorProcess

#: The simulator's failure kinds but the hang: "20% failures" that answer.
ANSWERING_FAILURES = [
    "status_500", "status_503", "status_429", "html", "bad_json", "wrong_type", "reset",
]  # fmt: skip


@dataclass(frozen=True)
class Upstream:
    name: str
    simulator: dict[str, object]
    #: The mean time of a request to a zero-overhead hedger, and its success rate.
    mean_ms: float
    success: float
    #: Asked of smart: a 5 s upstream needs a client deadline past the 3 s attempt limit.
    query: str = ""
    wrk_timeout_s: float = 5.0


def _random(hang_share: float) -> tuple[float, float]:
    model = ideal.hedged(ideal.Upstream(hang_share=hang_share), n=200_000)
    return float(model.latency_ms.mean()), 1.0 - model.error_rate


_FAIL_MEAN, _FAIL_OK = _random(0.0)
_HANG_MEAN, _HANG_OK = _random(1.0)
UPSTREAMS = (
    Upstream("fixed 100 ms", {"mode": "fixed", "fixed_ms": 100, "failure_rate": 0.0}, 100, 1),
    Upstream("fixed 2 s", {"mode": "fixed", "fixed_ms": 2000, "failure_rate": 0.0}, 2000, 1),
    Upstream(
        "fixed 5 s",
        {"mode": "fixed", "fixed_ms": 5000, "failure_rate": 0.0},
        5000,
        1,
        query="?timeout=10000",
        wrk_timeout_s=15,
    ),
    Upstream(
        "random, 20% failures",
        {
            "mode": "random",
            "min_ms": 100,
            "max_ms": 600,
            "failure_rate": 0.2,
            "failure_kinds": ANSWERING_FAILURES,
        },
        _FAIL_MEAN,
        _FAIL_OK,
    ),
    Upstream(
        "random, 20% hangs",
        {
            "mode": "random",
            "min_ms": 100,
            "max_ms": 600,
            "failure_rate": 0.2,
            "failure_kinds": ["hang"],
        },
        _HANG_MEAN,
        _HANG_OK,
    ),
)
CONNECTIONS = (200, 2000, 10000)
#: The old fixed limits, for the before/after points.
BEFORE_ENV = {"SMART_MAX_IN_FLIGHT": "256", "SMART_WORKER_CONNECTIONS": "4096"}
BEFORE_POINTS = (("fixed 100 ms", 2000), ("fixed 2 s", 2000), ("fixed 5 s", 2000))
#: A 1-minute load average above this means other work shares the cores: wait for it
#: to pass (bounded), then record it with the point and flag the point.
BUSY_LOAD = 1.5
QUIET_WAIT_S = 10.0


def wait_for_quiet() -> float:
    deadline = time.monotonic() + QUIET_WAIT_S
    while os.getloadavg()[0] > BUSY_LOAD and time.monotonic() < deadline:
        time.sleep(2)
    return round(os.getloadavg()[0], 2)


def row(p: Point, up: Upstream, variant: str, load_avg: float) -> dict[str, Any]:
    load = p.load
    cpus = os.cpu_count() or 1
    server_cpu_s = p.server_cpu_us_per_request * load.requests / 1e6
    utilisation = server_cpu_s / (load.duration_s * cpus)
    # What the workers' CPU could sustain at this point's cost per answered request.
    cpu_per_ok_s = server_cpu_s / max(1, load.ok)
    cpu_cap = cpus / cpu_per_ok_s if load.ok else float("inf")
    by_latency = p.connections / (up.mean_ms / 1000) * up.success
    target = min(by_latency, cpu_cap)
    peak, before = p.resources["peak"], p.resources["before"]
    calls = p.calls_per_request or 1.0
    in_flight = peak["upstream_in_flight"] / calls
    refused = load.statuses.get("503", 0)
    errors = sum(load.socket_errors.values())
    if refused and variant != "auto":
        ran_out = "the fixed cap"
    elif refused:
        # Far below the descriptor ceiling (thousands per worker): the lag limit,
        # which refuses only while a worker keeps its core busy.
        ran_out = "CPU (lag limit)"
    elif errors and up.name.endswith("hangs"):
        ran_out = "upstream (hung attempts)"
    elif errors:
        ran_out = "client timeouts"
    elif load.goodput >= 0.9 * by_latency:
        ran_out = "nothing: upstream latency bound"
    elif not load.requests:
        ran_out = "nothing answered in the window"
    else:
        ran_out = "CPU" if utilisation > 0.75 else "short window / shared cores"
    return {
        "upstream": up.name,
        "variant": variant,
        "connections": p.connections,
        "load_avg_at_start": load_avg,
        "goodput": round(load.goodput, 1),
        "ideal": round(by_latency, 1),
        "cpu_cap": round(cpu_cap, 1),
        "vs_ideal": round(load.goodput / target, 3) if target else None,
        "503": refused,
        "other_statuses": {k: v for k, v in load.statuses.items() if k not in ("200", "503")},
        "socket_errors": {k: v for k, v in load.socket_errors.items() if v},
        "cpu_utilisation": round(utilisation, 3),
        "calls_per_request": p.calls_per_request,
        "peak_in_flight": round(in_flight),
        "peak_fds": peak["fds"],
        "peak_rss_mib": peak["rss_mib"],
        "fds_per_in_flight": round((peak["fds"] - before["fds"]) / in_flight, 2)
        if in_flight >= 50
        else None,
        "kib_per_in_flight": round((peak["rss_mib"] - before["rss_mib"]) * 1024 / in_flight, 1)
        if in_flight >= 50
        else None,
        "ran_out": ran_out,
    }


def watch_cost_us() -> float:
    """CPU of watching one request's client socket (``ClientWatch``), in microseconds."""
    # The watcher needs gevent's loop, not patched sockets: a plain socket pair will do.
    from smart.edge.disconnect import ClientWatch  # noqa: PLC0415

    server, client = socket.socketpair()
    try:
        runs = 20_000

        def once() -> None:
            with ClientWatch(server):
                pass

        start = time.process_time()
        timeit.timeit(once, number=runs)
        return round((time.process_time() - start) / runs * 1e6, 2)
    finally:
        server.close()
        client.close()


def run(quick: bool) -> list[dict[str, Any]]:
    duration, warmup = (6.0, 1.0) if quick else (8.0, 2.0)
    rows: list[dict[str, Any]] = []
    with SimulatorProcess(**UPSTREAMS[0].simulator) as simulator:
        for up in UPSTREAMS:
            simulator.configure(**up.simulator)
            with serving("smart", simulator, {}) as server:
                for c in CONNECTIONS:
                    load_avg = wait_for_quiet()
                    p = measure(
                        "capacity", server, simulator, up.name, c, duration, warmup,
                        query=up.query, timeout_s=up.wrk_timeout_s,
                    )  # fmt: skip
                    rows.append(row(p, up, "auto", load_avg))
                    print(json.dumps(rows[-1]), flush=True)
        for name, c in BEFORE_POINTS:
            up = next(u for u in UPSTREAMS if u.name == name)
            simulator.configure(**up.simulator)
            with serving("smart", simulator, BEFORE_ENV) as server:
                load_avg = wait_for_quiet()
                p = measure(
                    "before", server, simulator, up.name, c, duration, warmup,
                    query=up.query, timeout_s=up.wrk_timeout_s,
                )  # fmt: skip
                rows.append(row(p, up, "before: cap 256", load_avg))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| upstream | limits | conns | load avg | goodput/s | ideal/s | vs ideal | 503 | "
        "socket errors | CPU | calls/req | in flight | fds/req | KiB/req | ran out first |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: "
        "| ---: | ---: | --- |\n"
    )
    lines = []
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in r["socket_errors"].items()) or "0"
        ideal_s = r["ideal"] if r["cpu_cap"] >= r["ideal"] else f"{r['cpu_cap']} (CPU)"
        lines.append(
            f"| {r['upstream']} | {r['variant']} | {r['connections']:,} | "
            f"{r['load_avg_at_start']} | {r['goodput']:,.0f} | {ideal_s} | "
            f"{r['vs_ideal']:.0%} | {r['503']:,} | {errors} | {r['cpu_utilisation']:.0%} | "
            f"{r['calls_per_request']:.2f} | {r['peak_in_flight']:,} | "
            f"{r['fds_per_in_flight'] if r['fds_per_in_flight'] is not None else '-'} | "
            f"{r['kib_per_in_flight'] if r['kib_per_in_flight'] is not None else '-'} | "
            f"{r['ran_out']} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for up in UPSTREAMS:
        points = [r for r in rows if r["upstream"] == up.name and r["variant"] == "auto"]
        ax.plot(
            [r["connections"] for r in points],
            [r["vs_ideal"] for r in points],
            marker="o",
            label=up.name,
        )
    before = [r for r in rows if r["variant"] != "auto"]
    ax.scatter(
        [r["connections"] for r in before],
        [r["vs_ideal"] for r in before],
        marker="x",
        color="black",
        label="before (cap 256), same run",
    )
    ax.set_xscale("log")
    ax.set_xlabel("wrk connections (closed loop, 2 workers)")
    ax.set_ylabel("goodput / ideal")
    ax.set_ylim(0, 1.1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("BENCH_QUICK")))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    RAW.mkdir(parents=True, exist_ok=True)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    rows = run(args.quick)
    out = Path(args.out)
    results = {
        "cpus": os.cpu_count(),
        "open_files_limit": hard,
        "quick": args.quick,
        "wall_s": round(time.monotonic() - started, 1),
        "client_watch_cpu_us": watch_cost_us(),
        "rows": rows,
    }
    (out / "capacity.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "capacity.md").write_text(table(rows))
    plot(rows, out / "capacity.png")
    print(table(rows))
    print(f"ClientWatch: {results['client_watch_cpu_us']} us per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
