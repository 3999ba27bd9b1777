"""When the hedges reach the upstream, and what smart adds after the winning reply.

Two gunicorn workers in front of the simulator on 127.0.0.1; timing is read from the
simulator's own record of each call. Bounded: 20 requests per case, 200 for overhead.
Run: ``.venv/bin/python -m bench.hedge_offsets``.
"""

from gevent import monkey

monkey.patch_all()

import statistics  # noqa: E402

import requests  # noqa: E402

from harness.gunicorn import Gunicorn  # noqa: E402
from simulator.process import SimulatorProcess  # noqa: E402

ROUNDS = 20
OVERHEAD_REQUESTS = 200
SLOW_FIRST = {
    "1": {"kind": "ok", "delay_ms": 2000},
    "2": {"kind": "ok", "delay_ms": 50},
    "3": {"kind": "ok", "delay_ms": 50},
}
FAILED_FIRST = {**SLOW_FIRST, "1": {"kind": "status", "status": 503, "delay_ms": 30}}


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    return (
        f"min {ordered[0]:.1f}  p50 {statistics.median(ordered):.1f}  "
        f"p99 {p99:.1f}  max {ordered[-1]:.1f} ms (n={len(ordered)})"
    )


def calls_of(sim: SimulatorProcess, request_id: str) -> dict[int, dict[str, float]]:
    recent = sim.stats()["recent"]
    return {int(c["attempt"]): c for c in recent if c["request_id"] == request_id}


def main() -> None:
    after_delay: list[float] = []
    after_failure: list[float] = []
    overhead: list[float] = []
    with (
        SimulatorProcess(mode="fixed", fixed_ms=20, failure_rate=0.0) as sim,
        Gunicorn({"SMART_UPSTREAM_URL": sim.work_url}, workers=2) as server,
        requests.Session() as client,
    ):
        url = server.url + "/api/smart?timeout=5000"
        for n in range(ROUNDS):
            for script, into, case in (
                (SLOW_FIRST, after_delay, "started"),
                (FAILED_FIRST, after_failure, "ended"),
            ):
                sim.reset()
                sim.by_attempt(script)
                request_id = f"{case}-{n}"
                client.get(url, headers={"X-Request-ID": request_id}, timeout=10)
                calls = calls_of(sim, request_id)
                into += [(calls[h]["started"] - calls[1][case]) * 1000 for h in (2, 3)]
        sim.reset()
        for _ in range(OVERHEAD_REQUESTS):
            timing = client.get(url, timeout=10).headers["Server-Timing"]
            durations = {
                part.split(";")[0].strip(): float(part.split("dur=")[1].split(";")[0])
                for part in timing.split(",")
            }
            overhead.append(durations["total"] - durations["upstream"])
    print("hedges after a slow attempt 1, from its arrival upstream: ", summary(after_delay))
    print("hedges after attempt 1's 503, from the 503 being sent:     ", summary(after_failure))
    print("Server-Timing total minus the winning attempt:              ", summary(overhead))


if __name__ == "__main__":
    main()
