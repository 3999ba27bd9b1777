"""The refusal pause, measured with the two clients it must serve.

One worker kept full (its cap of requests hang upstream); then, for each pause
setting, (a) wrk, which retries the instant it has its 503, on the same connection:
refusals per second and the worker's CPU; (b) a client that honours ``Retry-After``
on its keep-alive connection: time from its 503 to the answer of its retry. Run:
``python -m bench.retry_after`` (about a minute; 127.0.0.1 only).
"""

from __future__ import annotations

import json
import socket
import time

import requests

from bench.processes import RAW, Server, usage
from harness.wrk import run_wrk
from simulator.process import SimulatorProcess

CAP = 8
WRK_CONNECTIONS = 200
WRK_S = 6.0
POLITE_ROUNDS = 5
#: (name, SMART_REFUSAL_PAUSE_MAX_MS): one pause only (never past Retry-After), or
#: paused while full up to 4 s with a quiet connection read at once (the default).
SETTINGS = (("pause <= Retry-After", "1000"), ("up to 4 s, quiet read at once", "4000"))


def polite(url: str) -> list[float]:
    waits = []
    with requests.Session() as client:
        for _ in range(POLITE_ROUNDS):
            first = client.get(url, timeout=30)
            if first.status_code != 503:
                continue
            refused_at = time.monotonic()
            time.sleep(float(first.headers["Retry-After"]))  # what this client does
            client.get(url, timeout=30)
            waits.append(round(time.monotonic() - refused_at, 3))
    return waits


def main() -> None:
    RAW.mkdir(parents=True, exist_ok=True)
    with SimulatorProcess(mode="fixed", fixed_ms=5, failure_rate=0.0) as sim:
        sim.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
        for name, pause_max in SETTINGS:
            env = {
                "SMART_UPSTREAM_URL": sim.work_url,
                "SMART_MAX_IN_FLIGHT": str(CAP),
                "SMART_REFUSAL_PAUSE_MAX_MS": pause_max,
                "SMART_LOG_REQUESTS": "false",
            }
            with Server("smart", env, "retry_after", workers=1) as server:
                url = server.url + "/api/smart"
                # Fill the worker: requests that hang until their client hangs up.
                fill = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(CAP)]
                for sock in fill:
                    sock.sendall(b"GET /api/smart?timeout=60000 HTTP/1.1\r\nHost: smart\r\n\r\n")
                deadline = time.monotonic() + 10
                while sim.stats()["in_flight"] < CAP and time.monotonic() < deadline:
                    time.sleep(0.1)
                before = usage(server.pids())
                load = run_wrk(url, WRK_CONNECTIONS, WRK_S)
                after = usage(server.pids())
                waits = polite(url)
                for sock in fill:
                    sock.close()
                print(
                    json.dumps(
                        {
                            "pause": name,
                            "wrk_refusals_per_s": round(load.statuses.get("503", 0) / WRK_S, 1),
                            "wrk_statuses": load.statuses,
                            "worker_cpu_share": round((after.cpu_s - before.cpu_s) / WRK_S, 3),
                            "polite_wait_s": waits,
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
