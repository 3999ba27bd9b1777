"""CPU per call of each layer of smart's request path, in one process, without load.

``python -m bench.micro`` times (process CPU time, so other processes on the box do
not count) one upstream attempt, the hedger around a no-op attempt, and a whole request
through Flask's WSGI app, log line included; the simulator answers at once.
``bench.compare`` runs the same layers of two commits side by side in one process.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from gevent.pool import Pool  # noqa: E402

from simulator.process import SimulatorProcess  # noqa: E402

Layer = Callable[[], object]


def layers(package: str, work_url: str) -> dict[str, Layer]:
    """One callable per layer, built from ``package`` (``smart`` or an exported copy)."""
    config = importlib.import_module(f"{package}.config")
    upstream = importlib.import_module(f"{package}.upstream.client")
    hedging = importlib.import_module(f"{package}.hedging.hedge")
    outcome = importlib.import_module(f"{package}.hedging.outcome")
    app_module = importlib.import_module(f"{package}.app")
    settings = config.Settings(upstream_url=work_url, log_requests=True)
    client = upstream.UpstreamClient(settings)
    t0 = time.monotonic()
    success = outcome.Kind.SUCCESS

    def attempt() -> None:
        result = client.fetch_once(1, t0, "micro", 3.0)
        assert result.kind is success, result

    done = outcome.Outcome(1, success, 0.0, 0.0, 200, b'{"time": 1}')
    pool = Pool(100)
    policy = hedging.HedgePolicy(delay_s=0.3, fanout=2)

    def hedge() -> None:
        hedging.hedge(lambda number, t0: done, policy, pool=pool, deadline_s=None)

    app = app_module.create_app(settings)
    # The log line is formatted and written, to memory: the terminal's cost is not ours.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(io.StringIO())
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/api/smart",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
    }

    def whole() -> None:
        statuses: list[str] = []
        body = b"".join(app.wsgi_app(dict(environ), lambda s, h, e=None: statuses.append(s)))
        assert statuses == ["200 OK"], (statuses, body)

    return {
        "upstream attempt (fetch_once)": attempt,
        "hedge() around a no-op attempt": hedge,
        "whole request through Flask, log line included": whole,
    }


def cpu_us(fn: Layer, n: int) -> float:
    """CPU microseconds (user + system) per call over ``n`` calls."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(n):
        fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    spent = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return spent / n * 1e6


def interleaved(
    sides: dict[str, dict[str, Layer]], rounds: int, n: int
) -> dict[str, dict[str, float]]:
    """Median CPU per call of every layer of every side, the sides taking turns.

    Taking turns in short rounds spreads the drift of a shared machine's speed over
    every side alike.
    """
    samples: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    for _ in range(rounds):
        for side, calls in sides.items():
            for name, fn in calls.items():
                samples[side].setdefault(name, []).append(cpu_us(fn, n))
    return {
        side: {name: round(statistics.median(xs), 1) for name, xs in by_layer.items()}
        for side, by_layer in samples.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=150, help="calls per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with SimulatorProcess(mode="fixed", fixed_ms=0, failure_rate=0.0) as sim:
        sides = {"smart": layers("smart", sim.work_url)}
        results = interleaved(sides, args.rounds, args.n)["smart"]
    # One marked line: the app's start-up log line goes to stdout too.
    print("MICRO_JSON " + json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
