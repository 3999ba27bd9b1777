"""``make bench-https``: what HTTPS to the upstream costs, beside plain HTTP, in one run.

The random upstream (100-600 ms, 20% failures) at 50 and 500 connections, three ways
(HTTPS trusting certifi's bundle plus the run's CA, a trust store of production's size):
plain HTTP; HTTPS with a full handshake per new connection; HTTPS resuming the last
TLS session. Every cancelled loser closes its connection, so hedges cost handshakes:
the simulator counts them. Then, in-process, the client CPU of one attempt on a new
connection (a full handshake, a resumed one, plain TCP): steady even on a busy box.
Results in ``bench/results/https.json`` and ``https.md``. Bounded: about 3 minutes
(2 with ``--quick``; bench.sh stops it at 12).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import certifi

from bench.processes import RAW, RESULTS, ROOT
from bench.run import SIM_MODES, Point, machine, measure, serving
from simulator import SimulatorProcess

CONNECTIONS = (50, 500)
#: The same work for every variant: a fixed in-flight cap (256 a worker, above 500
#: connections over 2 workers), not the lag limit, which on a shared box would shed a
#: share of requests that depends on the neighbours' load rather than on TLS.
COMMON_ENV = {"SMART_LOOP_LAG_TARGET_MS": "0"}
#: name -> (simulator over TLS, smart's extra environment)
VARIANTS: dict[str, tuple[bool, dict[str, str]]] = {
    "http": (False, {}),
    "https": (True, {"SMART_UPSTREAM_TLS_SESSION_REUSE": "false"}),
    "https_resumed": (True, {"SMART_UPSTREAM_TLS_SESSION_REUSE": "true"}),
}
#: Attempts per in-process run: ~1 s of CPU. Each variant runs MICRO_RUNS times,
#: interleaved, and keeps its least: the neighbours' load only ever adds.
MICRO_ATTEMPTS = 400
MICRO_RUNS = 3


def run(duration_s: float, warmup_s: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, (tls, variant_env) in VARIANTS.items():
        with SimulatorProcess(tls=tls, **SIM_MODES["random"]) as simulator:
            env = {**COMMON_ENV, **variant_env}
            if tls:
                env["SMART_UPSTREAM_CA_BUNDLE"] = production_like_bundle(simulator)
            with serving("smart", simulator, env) as server:
                for connections in CONNECTIONS:
                    before = simulator.stats()
                    point = measure(
                        name, server, simulator, "random", connections, duration_s, warmup_s
                    )
                    after = simulator.stats()
                    rows.append(row(name, point, before, after))
    return rows


def production_like_bundle(simulator: SimulatorProcess) -> str:
    """certifi's bundle, which production trusts by default, plus the run's CA: a
    trust store of production's size (OpenSSL's verification cost grows with it)."""
    bundle = Path(simulator.ca_path).with_name("certifi-and-run-ca.pem")
    bundle.write_text(Path(certifi.where()).read_text() + Path(simulator.ca_path).read_text())
    return str(bundle)


def row(name: str, point: Point, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One point, with its handshakes. The warm-up's are included (both ``stats`` calls
    bracket it): per request of warm-up and measurement alike, so the ratio holds."""
    firsts = int(after["calls_by_attempt"].get("1", 0)) - int(
        before["calls_by_attempt"].get("1", 0)
    )
    handshakes = after.get("tls_handshakes", 0) - before.get("tls_handshakes", 0)
    resumed = after.get("tls_resumed", 0) - before.get("tls_resumed", 0)
    load = point.load
    return {
        "variant": name,
        "connections": point.connections,
        "rps": round(load.rps, 1),
        "goodput": round(load.goodput, 1),
        "p50_ms": load.percentile(50),
        "p99_ms": load.percentile(99),
        "statuses": load.statuses,
        "calls_per_request": point.calls_per_request,
        "server_cpu_us_per_request": point.server_cpu_us_per_request,
        "simulator_cpu_us_per_request": point.simulator_cpu_us_per_request,
        "handshakes_per_request": round(handshakes / firsts, 3) if firsts else 0.0,
        "resumed_share": round(resumed / handshakes, 3) if handshakes else 0.0,
    }


_MICRO = """
import json, sys, time
from gevent import monkey
monkey.patch_all()
from smart.config import Settings
from smart.upstream.client import UpstreamClient
url, ca, variant, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = UpstreamClient(Settings(upstream_url=url, upstream_ca_bundle=ca,
                                 upstream_tls_session_reuse=variant == "https_resumed"))
if variant == "https_stock":
    client._adapter.tls_context = None  # requests' own: a context per connection
close = {"Connection": "close"}  # a new connection each time, as after a cancelled loser
for _ in range(20):
    assert client.fetch_once(1, 0.0, "warm", 5.0, close).ok
cpu = time.process_time()
for _ in range(n):
    assert client.fetch_once(1, 0.0, "micro", 5.0, close).ok
print(json.dumps({"cpu_us_per_attempt": (time.process_time() - cpu) / n * 1e6}))
"""


#: In-process variants: the three above, and requests' own TLS set-up (a new context
#: per connection, the CA bundle loaded into each), as smart did before smart.upstream.tls.
MICRO_VARIANTS = (*VARIANTS, "https_stock")


def micro(attempts: int) -> dict[str, float]:
    """Client CPU of one attempt on a new connection, in a fresh process per run."""
    runs: dict[str, list[float]] = {name: [] for name in MICRO_VARIANTS}
    for name in MICRO_VARIANTS * MICRO_RUNS:
        tls = name != "http"
        with SimulatorProcess(tls=tls, mode="fixed", fixed_ms=0, failure_rate=0.0) as sim:
            bundle = production_like_bundle(sim) if tls else ""
            done = subprocess.run(
                [sys.executable, "-c", _MICRO, sim.work_url, bundle, name, str(attempts)],
                cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
        runs[name].append(json.loads(done.stdout)["cpu_us_per_attempt"])
    return {name: round(min(values), 1) for name, values in runs.items()}


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "# HTTPS vs HTTP to the upstream (`make bench-https`)",
        "",
        f"{info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']}; "
        f"load average at start {info['load_average_at_start'][0]:.2f}; {info['wall_s']} s.",
        "Random upstream (100-600 ms, 20% failures), smart with 2 workers, closed-loop wrk.",
        "",
        "| upstream | conns | req/s | p50 ms | p99 ms | calls/req | smart CPU µs/req "
        "| simulator CPU µs/req | handshakes/req | resumed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['connections']} | {r['rps']:.0f} | {r['p50_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {r['calls_per_request']:.2f} "
            f"| {r['server_cpu_us_per_request']:.0f} | {r['simulator_cpu_us_per_request']:.0f} "
            f"| {r['handshakes_per_request']:.2f} | {r['resumed_share']:.0%} |"
        )
    cost = info["micro_cpu_us_per_new_connection_attempt"]
    lines += [
        "",
        "Client CPU of one attempt on a new connection (in-process, least of "
        f"{MICRO_RUNS} runs of {MICRO_ATTEMPTS} attempts): plain HTTP {cost['http']:.0f} µs, "
        f"HTTPS full handshake {cost['https']:.0f} µs, "
        f"HTTPS resumed {cost['https_resumed']:.0f} µs "
        f"(resumed / full = {cost['https_resumed'] / cost['https']:.2f}); with requests' "
        f"own TLS set-up (a context per connection, certifi's bundle loaded into each) "
        f"{cost['https_stock']:.0f} µs ({cost['https_stock'] / cost['https']:.1f}x the "
        "full handshake with one context per worker).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("BENCH_QUICK")))
    parser.add_argument("--out", default=str(RESULTS), help="where results are written")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    RAW.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    info = machine()
    rows = run(duration_s=5 if args.quick else 10, warmup_s=1 if args.quick else 2)
    info["micro_cpu_us_per_new_connection_attempt"] = micro(MICRO_ATTEMPTS)
    info["load_average_at_end"] = os.getloadavg()
    info["wall_s"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "https.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    (out / "https.md").write_text(markdown(rows, info))
    print(markdown(rows, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
