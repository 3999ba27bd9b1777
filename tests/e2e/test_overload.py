"""Overload protection end to end, under real gunicorn: the in-flight cap, the probes
that are never shed, the deadline rule, and the hedge budget.

One worker per server, so that its cap and its budget are the ones the test fills.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from gevent.pool import Pool

from simulator.process import SimulatorProcess
from tests.support import Gunicorn, Servers, scrape_total, wait_until

#: The cap of the server under test, and as many requests that hang upstream.
CAP = 4
#: "At once": the refusal is a comparison and a small JSON body. This bounds a whole
#: round trip over loopback on a loaded CI box, far below the hanging requests' time.
AT_ONCE_S = 0.5
#: The server's pause after a refusal (SMART_REFUSAL_PAUSE_MS, its default).
REFUSAL_PAUSE_S = 1.0
#: How long the requests that fill the worker hang before their 504: shorter than the
#: longest a refused connection is paused (SMART_REFUSAL_PAUSE_MAX_MS, 4 s).
HANG_TIMEOUT_MS = 3000
#: A request that must end soon once admitted, against a hanging upstream.
SHORT_TIMEOUT_MS = 200
#: Bound on threads of the test finishing that are already answered or about to be.
PROMPTLY_S = 5.0
#: The longest a refused connection is paused (SMART_REFUSAL_PAUSE_MAX_MS, its default).
REFUSAL_PAUSE_MAX_S = 4.0
#: Clients that get a 503 and hang up while their connection is paused.
REFUSED_CLIENTS = 20
#: The lag-limit test: its worker's cap, and the requests that hang in it (well below).
LAG_CAP, LAG_HELD = 16, 4
#: One stop of the worker process: five times the default lag target of 10 ms, and
#: nothing next to gunicorn's 30 s heartbeat. Several make a 100 ms window's median.
STALL_S, STALLS_PER_LOOK = 0.05, 6
#: Generous bound on the controller reacting: many 100 ms windows on a loaded box.
LAG_REACTION_S = 10.0
#: Hedge budget of the server under test: hedges may be half of the first attempts,
#: with no reserve, over a window far longer than the test.
BUDGET_RATIO = 0.5
#: Sequential requests whose attempt 1 fails, each wanting two hedges.
BUDGET_REQUESTS = 20


pytestmark = [
    pytest.mark.simulator(mode="fixed", fixed_ms=5, failure_rate=0.0),
    pytest.mark.usefixtures("clean_simulator"),
]


def get(
    server: Gunicorn, query: str = "", path: str = "/api/smart", **kwargs: Any
) -> requests.Response:
    kwargs.setdefault("timeout", 10)
    kwargs["headers"] = {"Connection": "close", **kwargs.get("headers", {})}
    return requests.get(f"{server.url}{path}{query}", **kwargs)


@pytest.fixture(scope="module")
def capped(simulator: SimulatorProcess, module_servers: Servers) -> Gunicorn:
    env = {"SMART_UPSTREAM_URL": simulator.work_url, "SMART_MAX_IN_FLIGHT": str(CAP)}
    return module_servers.start(env, workers=1)


# --- the in-flight cap -----------------------------------------------------------------


def test_a_full_worker_answers_the_next_request_with_503_at_once_and_probes_still_pass(
    capped: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    hanging = Pool(CAP)
    held = [hanging.spawn(get, capped, f"?timeout={HANG_TIMEOUT_MS}") for _ in range(CAP)]
    assert wait_until(lambda: simulator.stats()["in_flight"] == CAP, AT_ONCE_S * 4)

    refused = get(capped, "?timeout=1000")
    assert refused.status_code == 503
    assert refused.elapsed.total_seconds() < AT_ONCE_S
    assert refused.headers["Retry-After"] == "1"
    body = refused.json()
    assert body["error"] == "overloaded" and body["attempts"] == []
    assert simulator.stats()["calls"] == CAP  # the refused request never went upstream

    for path in ("/healthz", "/readyz", "/metrics"):
        probe = get(capped, path=path)
        assert probe.status_code == 200
        assert probe.elapsed.total_seconds() < AT_ONCE_S

    assert hanging.join(timeout=HANG_TIMEOUT_MS / 1000 + 5)
    assert [r.value.status_code for r in held] == [504] * CAP
    simulator.reset()
    assert get(capped, "?timeout=1000").status_code == 200  # the slots are free again


def test_a_client_retrying_at_once_on_a_refused_connection_waits_while_the_worker_is_full(
    capped: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    hanging = Pool(CAP)
    held = [hanging.spawn(get, capped, f"?timeout={HANG_TIMEOUT_MS}") for _ in range(CAP)]
    assert wait_until(lambda: simulator.stats()["in_flight"] == CAP, AT_ONCE_S * 4)
    with requests.Session() as client:  # one keep-alive connection
        first = client.get(capped.url + "/api/smart", timeout=10)
        # A new connection is answered at once, while the refused one is paused.
        fresh = get(capped)
        again = client.get(f"{capped.url}/api/smart?timeout={SHORT_TIMEOUT_MS}", timeout=10)
    assert (first.status_code, fresh.status_code) == (503, 503)
    assert first.elapsed.total_seconds() < AT_ONCE_S
    assert fresh.elapsed.total_seconds() < AT_ONCE_S
    # The retry was read only once the hanging requests had their answers, a pause at a
    # time, so it found a free slot: admitted, it ran into its own short timeout.
    assert again.elapsed.total_seconds() >= REFUSAL_PAUSE_S
    assert all(g.ready() for g in held)
    assert again.status_code == 504 and again.json()["error"] == "upstream_timeout"
    assert hanging.join(timeout=PROMPTLY_S)


def test_refused_connections_whose_clients_hang_up_while_paused_are_closed(
    capped: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    hanging = Pool(CAP)
    for _ in range(CAP):
        hanging.spawn(get, capped, f"?timeout={HANG_TIMEOUT_MS}")
    assert wait_until(lambda: simulator.stats()["in_flight"] >= CAP, AT_ONCE_S * 4)
    (worker,) = capped.worker_pids()
    for _ in range(REFUSED_CLIENTS):
        with socket.create_connection(("127.0.0.1", capped.port), timeout=10) as client:
            client.sendall(b"GET /api/smart HTTP/1.1\r\nHost: smart\r\n\r\n")
            # The whole answer is read, so that closing sends a FIN, not a reset: the
            # worker's end then waits in CLOSE_WAIT, where a leak would show.
            assert read_response(client).startswith(b"HTTP/1.1 503")
    # The worker holds each of them, unread, until its pause ends; then it reads the
    # client's end of the stream and closes. Nothing of them may stay behind.
    assert wait_until(
        lambda: client_sockets(worker, capped.port) == 0, REFUSAL_PAUSE_MAX_S + PROMPTLY_S
    )
    assert hanging.join(timeout=PROMPTLY_S)


def read_response(client: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length, read to its last byte."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += client.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    (length,) = [
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ]
    while len(body) < length:
        body += client.recv(4096)
    return data


def client_sockets(pid: int, port: int) -> int:
    """The worker's sockets of client connections to ``port``, in any state."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections("tcp")
        if c.laddr.port == port and c.status != psutil.CONN_LISTEN
    )


def test_a_worker_whose_event_loop_lags_refuses_below_its_cap_by_default(
    simulator: SimulatorProcess, tmp_path: Path
) -> None:
    env = {
        "SMART_UPSTREAM_URL": simulator.work_url,
        "SMART_MAX_IN_FLIGHT": str(LAG_CAP),
        "SMART_MIN_IN_FLIGHT": "1",
        "SMART_LOOP_LAG_TARGET_MS": "",  # unset: the default, which the harness pins off
    }
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    with Gunicorn(env, workers=1, tmp_path=tmp_path) as server:
        (worker,) = server.worker_pids()
        hanging = Pool(LAG_HELD)
        for _ in range(LAG_HELD):
            hanging.spawn(get, server, f"?timeout={HANG_TIMEOUT_MS}")
        assert wait_until(lambda: simulator.stats()["in_flight"] >= LAG_HELD, AT_ONCE_S * 4)

        def stalled_until_lowered() -> bool:
            # Stopping the worker's process makes every timer of its loop late, as a
            # saturated core would.
            for _ in range(STALLS_PER_LOOK):
                os.kill(worker, signal.SIGSTOP)
                try:
                    time.sleep(STALL_S)
                finally:
                    os.kill(worker, signal.SIGCONT)
            return scrape_total(server, "smart_in_flight_limit") < LAG_HELD

        assert wait_until(stalled_until_lowered, LAG_REACTION_S)
        refused = get(server, "?timeout=1000")  # 4 in flight, far below the cap of 16
        assert refused.status_code == 503
        assert refused.json()["error"] == "overloaded"
        assert hanging.join(timeout=HANG_TIMEOUT_MS / 1000 + PROMPTLY_S)


def test_refusals_are_logged_as_overloaded(capped: Gunicorn, simulator: SimulatorProcess) -> None:
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    hanging = Pool(CAP)
    for _ in range(CAP):
        hanging.spawn(get, capped, "?timeout=1000", headers={"X-Request-ID": "holder"})
    assert wait_until(lambda: simulator.stats()["in_flight"] == CAP, AT_ONCE_S * 4)
    get(capped, headers={"X-Request-ID": "refused-1"})
    assert hanging.join(timeout=5)
    (line,) = [r for r in capped.request_lines() if r["request_id"] == "refused-1"]
    assert line["status"] == 503 and line["outcome"] == "overloaded"


# --- the deadline rule -------------------------------------------------------------------


def test_a_timeout_shorter_than_any_attempt_is_a_504_at_once_without_an_upstream_call(
    capped: Gunicorn, simulator: SimulatorProcess
) -> None:
    response = get(capped, "?timeout=4")
    assert response.status_code == 504
    assert response.json()["error"] == "upstream_timeout"
    assert response.json()["attempts"] == []
    assert simulator.stats()["calls"] == 0


def test_a_50_ms_timeout_is_honoured_against_a_fast_upstream(
    capped: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt(
        {
            "1": {"kind": "status", "status": 503, "delay_ms": 5},
            "2": {"kind": "ok", "delay_ms": 5},
            "3": {"kind": "ok", "delay_ms": 5},
        }
    )
    response = get(capped, "?timeout=50")
    assert response.status_code == 200
    assert response.headers["X-Smart-Winner"] in {"2", "3"}


# --- the hedge budget --------------------------------------------------------------------


@pytest.fixture(scope="module")
def budgeted(simulator: SimulatorProcess, module_servers: Servers) -> Gunicorn:
    env = {
        "SMART_UPSTREAM_URL": simulator.work_url,
        "SMART_HEDGE_BUDGET_RATIO": str(BUDGET_RATIO),
        "SMART_HEDGE_BUDGET_MIN_PER_S": "0",
        "SMART_HEDGE_BUDGET_WINDOW_S": "600",
    }
    return module_servers.start(env, workers=1)


def test_the_hedge_budget_caps_hedges_at_its_share_of_first_attempts(
    budgeted: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt(
        {
            "1": {"kind": "status", "status": 503, "delay_ms": 5},
            "2": {"kind": "ok", "delay_ms": 5},
            "3": {"kind": "ok", "delay_ms": 5},
        }
    )
    ids = [f"budget-{n}" for n in range(BUDGET_REQUESTS)]
    statuses = [get(budgeted, headers={"X-Request-ID": i}).status_code for i in ids]

    hedged = [c for c in simulator.stats()["recent"] if c["attempt"] != "1"]
    assert len(hedged) == BUDGET_RATIO * BUDGET_REQUESTS
    assert statuses.count(200) == len(hedged)  # each hedge that went out rescued one
    assert set(statuses) == {200, 502}
    lines = [r for r in budgeted.request_lines() if r["request_id"] in ids]
    suppressed = sum(int(r["hedges_suppressed"]) for r in lines)  # type: ignore[call-overload]
    assert suppressed == 2 * BUDGET_REQUESTS - len(hedged)


def test_the_hedge_budget_is_off_by_default(capped: Gunicorn, simulator: SimulatorProcess) -> None:
    simulator.by_attempt({"1": {"kind": "status", "status": 503, "delay_ms": 5}})
    for _ in range(BUDGET_REQUESTS // 2):
        assert get(capped).status_code == 200
    hedged = [c for c in simulator.stats()["recent"] if c["attempt"] != "1"]
    assert len(hedged) == 2 * (BUDGET_REQUESTS // 2)


def test_an_in_flight_cap_at_gunicorns_connection_limit_stops_the_server(tmp_path: Path) -> None:
    env = {
        "SMART_UPSTREAM_URL": "http://127.0.0.1:9/api/work",
        "SMART_MAX_IN_FLIGHT": "100",
        "SMART_WORKER_CONNECTIONS": "100",
    }
    server = Gunicorn(env, workers=1, tmp_path=tmp_path)
    with pytest.raises(RuntimeError, match=r"SMART_WORKER_CONNECTIONS \(100\) must stay above"):
        server.start()
