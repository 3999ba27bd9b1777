"""What metrics and logs cost: throughput and latency of smart with them on and off.

One gunicorn worker in front of the simulator answering in a fixed time, driven by a
closed loop of keep-alive clients for a few seconds per round; rounds alternate
on/off so drift on a shared machine hits both alike. Takes well under a minute:

    python bench/instrumentation_cost.py [--seconds 5] [--clients 20] [--rounds 2]

"On" is the default production setting (SMART_METRICS, SMART_LOG_REQUESTS and
SMART_ACCESS_LOG true, logs written to a file); "off" turns all three off. Tracing
stays off in both: it is opt-in. On a shared machine the end-to-end difference is
within the noise of a few seconds' run, so the script then times each signal's work
per request in-process, which is steady.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.gunicorn import Gunicorn  # noqa: E402
from simulator.process import SimulatorProcess  # noqa: E402
from smart.observability.access_log import JsonAccessLogger  # noqa: E402

#: The simulated upstream's fixed answer time: the latency floor of every request.
UPSTREAM_MS = 20
#: Time for the worker's pools and caches to warm up before measuring.
WARMUP_S = 1.0
REQUEST = b"GET /api/smart?timeout=2000 HTTP/1.1\r\nHost: bench\r\n\r\n"
SETTINGS = {
    "on": {"SMART_METRICS": "true", "SMART_LOG_REQUESTS": "true", "SMART_ACCESS_LOG": "true"},
    "off": {"SMART_METRICS": "false", "SMART_LOG_REQUESTS": "false", "SMART_ACCESS_LOG": "false"},
}


def client(port: int, until: float, latencies: list[float], errors: list[int]) -> None:
    """One keep-alive connection sending requests back to back until ``until``."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = sock.makefile("rb")
    try:
        while time.monotonic() < until:
            started = time.monotonic()
            sock.sendall(REQUEST)
            status = stream.readline()
            length = 0
            while (line := stream.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            stream.read(length)
            latencies.append(time.monotonic() - started)
            if not status.startswith(b"HTTP/1.1 200"):
                errors.append(1)
    finally:
        stream.close()
        sock.close()


def measure(port: int, clients: int, seconds: float) -> tuple[float, float, float, int]:
    """(requests per second, p50 ms, p99 ms, errors) of a closed loop of ``clients``."""
    warm: list[float] = []
    gevent.joinall([gevent.spawn(client, port, time.monotonic() + WARMUP_S, warm, [])])
    latencies: list[float] = []
    errors: list[int] = []
    until = time.monotonic() + seconds
    started = time.monotonic()
    gevent.joinall([gevent.spawn(client, port, until, latencies, errors) for _ in range(clients)])
    took = time.monotonic() - started
    ms = sorted(x * 1000 for x in latencies)
    return len(ms) / took, statistics.median(ms), ms[int(len(ms) * 0.99)], len(errors)


def per_request_us(run: object, count: int = 20_000) -> float:
    started = time.perf_counter()
    for _ in range(count):
        run()  # type: ignore[operator]
    return (time.perf_counter() - started) / count * 1e6


def micro(workdir: Path) -> dict[str, float]:
    """Microseconds of CPU each signal costs one request, measured in this process."""
    # Multiprocess storage, as under gunicorn: chosen when prometheus_client is imported.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(workdir)
    from smart.hedging.hedge import HedgeResult, Trigger  # noqa: PLC0415
    from smart.hedging.outcome import Kind, Outcome  # noqa: PLC0415
    from smart.observability.logs import JsonFormatter  # noqa: PLC0415
    from smart.observability.metrics import build_metrics  # noqa: PLC0415
    from smart.observability.telemetry import RequestRecord, log_fields, record_metrics  # noqa: PLC0415

    metrics = build_metrics(3)
    ok = Outcome(1, Kind.SUCCESS, 0.0003, 0.02, status=200, body=b'{"time": 20}')
    simple = RequestRecord(
        "0123456789abcdef", 200, "success", 2000, 0.021, HedgeResult(ok, (ok,), None, 0, 0.021)
    )
    failed = Outcome(1, Kind.HTTP_STATUS, 0.0003, 0.005, status=503)
    won = Outcome(2, Kind.SUCCESS, 0.006, 0.02, status=200, body=b'{"time": 20}')
    lost = Outcome(3, Kind.CANCELLED, 0.006, 0.02)
    hedged = RequestRecord(
        "0123456789abcdef", 200, "success", 2000, 0.027,
        HedgeResult(won, (failed, won, lost), Trigger.EARLY_FAILURE, 0, 0.027),
    )  # fmt: skip
    app_log = logging.getLogger("bench.request")
    app_log.propagate = False
    app_log.setLevel(logging.INFO)
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(JsonFormatter())
    app_log.addHandler(handler)

    access = logging.getLogger("gunicorn.access")
    access.propagate = False
    access.setLevel(logging.INFO)
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(JsonFormatter())
    access.handlers[:] = [handler]
    logger = JsonAccessLogger.__new__(JsonAccessLogger)
    logger.access_log = access

    class Response:
        status = "200 OK"
        headers = (("Content-Type", "application/json"), ("X-Request-ID", "0123456789abcdef"))
        sent = 12

    class Request:
        headers = (("HOST", "bench"), ("USER-AGENT", "bench"))

    environ = {"REMOTE_ADDR": "127.0.0.1", "REQUEST_METHOD": "GET", "PATH_INFO": "/api/smart"}
    took = datetime.timedelta(milliseconds=21)

    def gauges() -> None:
        metrics.requests_in_flight.inc()
        metrics.attempts_in_flight.inc()
        metrics.attempts_in_flight.dec()
        metrics.requests_in_flight.dec()

    return {
        "metrics, one attempt": per_request_us(lambda: record_metrics(metrics, simple)),
        "metrics, three attempts": per_request_us(lambda: record_metrics(metrics, hedged)),
        "in-flight gauges": per_request_us(gauges),
        "request log line": per_request_us(
            lambda: app_log.info("request", extra=log_fields(simple))
        ),
        "access log line": per_request_us(
            lambda: logger.access(Response(), Request(), environ, took)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per round")
    parser.add_argument("--clients", type=int, default=20, help="concurrent connections")
    parser.add_argument("--rounds", type=int, default=2, help="on/off pairs")
    args = parser.parse_args()

    results: dict[str, list[tuple[float, float, float, int]]] = {"on": [], "off": []}
    with SimulatorProcess(mode="fixed", fixed_ms=UPSTREAM_MS, failure_rate=0.0) as sim:
        for _ in range(args.rounds):
            for name in ("on", "off"):
                with tempfile.TemporaryDirectory(prefix="smart-bench-") as tmp:
                    env = {**SETTINGS[name], "SMART_UPSTREAM_URL": sim.work_url}
                    env = {**env, "SMART_KEEPALIVE_S": "1"}
                    with Gunicorn(env, workers=1, tmp_path=Path(tmp)) as server:
                        results[name].append(measure(server.port, args.clients, args.seconds))

    print(
        f"upstream {UPSTREAM_MS} ms fixed, 1 worker, {args.clients} keep-alive clients, "
        f"{args.rounds} x {args.seconds:g} s per setting"
    )
    print(f"{'setting':8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    summary = {}
    for name, rounds in results.items():
        rps = statistics.mean(r[0] for r in rounds)
        p50 = statistics.mean(r[1] for r in rounds)
        p99 = statistics.mean(r[2] for r in rounds)
        summary[name] = (rps, p50)
        print(f"{name:8} {rps:8.0f} {p50:8.1f} {p99:8.1f} {sum(r[3] for r in rounds):7d}")
    (on_rps, on_p50), (off_rps, off_p50) = summary["on"], summary["off"]
    print(
        f"on vs off: {100 * (on_rps - off_rps) / off_rps:+.1f}% throughput, "
        f"{on_p50 - off_p50:+.2f} ms p50"
    )
    with tempfile.TemporaryDirectory(prefix="smart-bench-") as tmp:
        costs = micro(Path(tmp))
    print("CPU per request, in-process:")
    for name, us in costs.items():
        print(f"  {name:26} {us:6.1f} us")
    total = costs["metrics, one attempt"] + costs["in-flight gauges"]
    total += costs["request log line"] + costs["access log line"]
    print(f"  {'all, one-attempt request':26} {total:6.1f} us")


if __name__ == "__main__":
    main()
