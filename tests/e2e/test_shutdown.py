"""Graceful shutdown under real gunicorn: SIGTERM to the master, as a platform sends it.

From the signal on, /readyz fails, new connections are refused, the requests already in
flight get their answers, and the master exits 0.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from pathlib import Path

import requests
from gevent.pool import Pool

from simulator.process import SimulatorProcess
from tests.support import Gunicorn, wait_until

#: How long each request in flight at SIGTERM takes upstream: long enough that the
#: listener is closed (gunicorn's worker loop looks at its flag once a second) well
#: before any of them is answered, even on a loaded CI box.
IN_FLIGHT_S = 3.0
#: gunicorn's worker checks once a second whether it should stop; then it closes its
#: listener. Signal delivery and a loaded box add the rest.
STOPS_ACCEPTING_WITHIN_S = 2.0
#: Requests in flight at SIGTERM, spread over both workers.
IN_FLIGHT = 6
#: Client keep-alive timeout of the server under test. After its answer, a connection
#: whose request was in flight at SIGTERM stays open until the client closes it or
#: this passes: gunicorn sent it as keep-alive, and only then learned it must stop.
KEEPALIVE_S = 1
#: From SIGTERM to exit: the answers, the keep-alive wait, gunicorn's once-a-second
#: checks (worker and master), and a loaded box's slack.
EXITS_WITHIN_S = IN_FLIGHT_S + KEEPALIVE_S + 2.0 + 2.0


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def lines_saying(server: Gunicorn, msg: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in list(server.stdout) if f'"msg": "{msg}"' in line]


def drain_lines(server: Gunicorn) -> list[dict[str, object]]:
    return lines_saying(server, "draining")


def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_exits_zero(
    tmp_path: Path,
) -> None:
    with SimulatorProcess(mode="fixed", fixed_ms=int(IN_FLIGHT_S * 1000), failure_rate=0.0) as sim:
        env = {
            "SMART_UPSTREAM_URL": sim.work_url,
            "SMART_HEDGE_DELAY_MS": "30000",  # one attempt per request: easier to count
            "SMART_ATTEMPT_TIMEOUT_MS": "30000",
            "SMART_KEEPALIVE_S": str(KEEPALIVE_S),
        }
        server = Gunicorn(env, workers=2, tmp_path=tmp_path)
        server.start()
        try:
            # The harness returns once one worker answers; the other may still be
            # loading the app, and a SIGTERM then finds no app to tell.
            assert wait_until(lambda: len(lines_saying(server, "worker ready")) == 2, 10)
            port = server.port
            # An idle keep-alive connection opened before the signal: the only way to
            # ask a draining worker anything once its listener is closed.
            probe = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            probe.request("GET", "/readyz")
            assert probe.getresponse().read() == b'{"status":"ready"}'

            pool = Pool(IN_FLIGHT)
            queries = ["?timeout=20000", ""] * (IN_FLIGHT // 2)
            answers = [
                pool.spawn(requests.get, f"{server.url}/api/smart{q}", timeout=30) for q in queries
            ]
            assert wait_until(lambda: sim.stats()["in_flight"] == IN_FLIGHT, IN_FLIGHT_S / 2)
            signalled = time.monotonic()
            server.signal(signal.SIGTERM)

            assert wait_until(lambda: len(drain_lines(server)) == 2, STOPS_ACCEPTING_WITHIN_S)
            probe.request("GET", "/readyz")
            readiness = probe.getresponse()
            assert readiness.status == 503
            assert readiness.read() == b'{"status":"draining"}'

            assert wait_until(lambda: refuses_connections(port), STOPS_ACCEPTING_WITHIN_S)
            assert sim.stats()["in_flight"] == IN_FLIGHT, "accepting stopped only after answers"

            assert pool.join(timeout=EXITS_WITHIN_S)
            assert [a.value.status_code for a in answers] == [200] * IN_FLIGHT
            assert server.wait(timeout=EXITS_WITHIN_S) == 0
            took = time.monotonic() - signalled
        finally:
            server.stop()
    assert took < EXITS_WITHIN_S
    assert sum(line["requests_in_flight"] for line in drain_lines(server)) == IN_FLIGHT
    assert "graceful timeout" not in server.logs().lower()


def test_an_idle_server_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    server = Gunicorn({"SMART_UPSTREAM_URL": "http://127.0.0.1:9/api/work"}, tmp_path=tmp_path)
    server.start()
    try:
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=EXITS_WITHIN_S) == 0
        took = time.monotonic() - signalled
    finally:
        server.stop()
    # gunicorn's worker looks at its flag once a second, then finds nothing in flight.
    assert took < STOPS_ACCEPTING_WITHIN_S + 1.0
