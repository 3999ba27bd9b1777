"""Where a request's CPU goes: py-spy samples of one loaded worker, by library.

``python -m bench.profile [--server smart|naive] [--connections 50]`` runs the fixed
100 ms upstream under wrk against a one-worker server, measures the worker's CPU per
request from /proc without the profiler, then samples it with py-spy and splits the
user time by the innermost frame that belongs to a known layer. System time is the
kernel's (sockets, epoll, writes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.processes import RAW, Server, usage
from harness.wrk import run_wrk
from simulator.process import SimulatorProcess

#: Layers by the path py-spy prints for a frame's file. stdlib modules that are not a
#: layer of their own (socket, abc, enum, re...) are charged to the frame that called them.
LAYERS: tuple[tuple[str, str], ...] = (
    ("smart/", "smart"),
    ("bench/", "smart"),
    ("flask/", "flask/werkzeug"),
    ("werkzeug/", "flask/werkzeug"),
    ("gunicorn/", "gunicorn"),
    ("requests/", "requests/urllib3"),
    ("urllib3/", "requests/urllib3"),
    ("http/client", "requests/urllib3"),
    ("email/", "requests/urllib3"),
    ("http/cookiejar", "requests/urllib3"),
    ("gevent/", "gevent"),
    ("greenlet", "gevent"),
    ("json/", "json"),
    ("logging/", "logging"),
    ("opentelemetry/", "telemetry"),
    ("prometheus_client/", "telemetry"),
)
#: gevent's threadpool threads wait on a real lock, which py-spy counts as running.
IDLE_FRAMES = ("acquire_with_timeout",)


def layer_of(frame: str) -> str | None:
    path = frame.rpartition("(")[2]
    for prefix, layer in LAYERS:
        if path.startswith(prefix) or f"/{prefix}" in path:
            return layer
    return None


def split_samples(raw: str) -> Counter[str]:
    """Samples per layer, from py-spy's raw (collapsed stack) output."""
    layers: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or any(idle in frames[-1] for idle in IDLE_FRAMES):
            continue
        owner = next((lay for f in reversed(frames) if (lay := layer_of(f))), "other")
        if frames[-1].startswith("Hub.run") or "(gevent/hub.py" in frames[-1]:
            owner = "gevent"
        layers[owner] += int(count)
    return layers


def top_functions(raw: str, limit: int = 25) -> list[tuple[str, int]]:
    """Inclusive samples per function: what to look at first."""
    inclusive: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit() or any(idle in stack for idle in IDLE_FRAMES):
            continue
        for frame in set(stack.split(";")):
            inclusive[frame] += int(count)
    return inclusive.most_common(limit)


def profile(
    server_kind: str, connections: int, seconds: float, env: dict[str, str], spy: bool = True
) -> dict[str, Any]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    RAW.mkdir(parents=True, exist_ok=True)
    with SimulatorProcess(mode="fixed", fixed_ms=100, failure_rate=0.0) as sim:
        env = {"SMART_UPSTREAM_URL": sim.work_url, **env}
        with Server(server_kind, env, f"profile-{server_kind}", workers=1) as server:
            url = server.url + "/api/smart"
            run_wrk(url, connections, 2)
            (worker,) = server.worker_pids()
            before = usage([worker])
            load = run_wrk(url, connections, seconds)
            after = usage([worker])
            n = max(1, load.requests)
            user_us = (after.user_s - before.user_s) / n * 1e6
            system_us = (after.system_s - before.system_s) / n * 1e6
            if not spy:
                return {
                    "rps": round(load.rps, 1),
                    "cpu_us_per_request": round(user_us + system_us, 1),
                    "user_us_per_request": round(user_us, 1),
                    "system_us_per_request": round(system_us, 1),
                }
            with open(RAW / "profile.txt", "w+") as out:
                loader = threading.Thread(target=run_wrk, args=(url, connections, seconds + 3))
                loader.start()
                time.sleep(1)
                subprocess.run(
                    [
                        py_spy,
                        "record",
                        "-p",
                        str(worker),
                        "-d",
                        str(int(seconds)),
                        "-r",
                        "250",
                        "-f",
                        "raw",
                        "-o",
                        out.name,
                    ],
                    check=True,
                    capture_output=True,
                    timeout=seconds + 30,
                )
                loader.join(timeout=seconds + 60)
                raw = Path(out.name).read_text()
    layers = split_samples(raw)
    total = sum(layers.values()) or 1
    breakdown = {name: round(user_us * count / total, 1) for name, count in layers.most_common()}
    breakdown["kernel"] = round(system_us, 1)
    return {
        "server": server_kind,
        "connections": connections,
        "rps": round(load.rps, 1),
        "p50_ms": load.percentile(50),
        "p99_ms": load.percentile(99),
        "cpu_us_per_request": round(user_us + system_us, 1),
        "us_per_request_by_layer": breakdown,
        "samples": total,
        "top_inclusive": [(frame, count) for frame, count in top_functions(raw)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="smart", choices=("smart", "naive"))
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    parser.add_argument("--json", action="store_true", help="print one marked JSON line")
    parser.add_argument("--no-spy", action="store_true", help="CPU per request only")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    result = profile(args.server, args.connections, args.seconds, env, spy=not args.no_spy)
    if args.json or args.no_spy:
        print("PROFILE_JSON " + json.dumps(result))
        return 0
    print(
        f"{result['server']}: c={result['connections']} {result['rps']} req/s "
        f"p50={result['p50_ms']:.1f} ms p99={result['p99_ms']:.1f} ms; "
        f"{result['cpu_us_per_request']} us CPU per request"
    )
    for name, us in result["us_per_request_by_layer"].items():
        print(f"  {name:<18} {us:8.1f} us")
    print("top (inclusive samples):")
    for frame, count in result["top_inclusive"]:
        print(f"  {count:6d}  {frame[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
