"""A client that leaves cancels its request: the attempts are killed, the slot freed,
and the request recorded as 499 ``client_closed``. A pipelined request is no leaving.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import requests
from gevent.event import Event
from gevent.pool import Pool
from prometheus_client.parser import text_string_to_metric_families

from simulator.process import SimulatorProcess
from smart.edge.disconnect import ClientWatch
from smart.hedging.hedge import Cancelled, HedgePolicy, hedge
from smart.hedging.outcome import Kind, Outcome
from tests.support import Gunicorn, scrape_total, wait_until

#: The issue's bound: the upstream sees every attempt aborted this soon after the
#: client's close (the watcher reacts within a turn of the event loop; the rest is
#: loopback and a loaded CI box).
ABORTED_WITHIN_S = 0.3
#: Bound on things that happen at once: a watcher's wake-up, a killed greenlet.
PROMPTLY_S = 1.0
#: Time for the hanging attempts to reach the upstream: the hedges start at 300 ms.
ATTEMPTS_STARTED_WITHIN_S = 5.0
#: The upstream's answer time when it answers: short, so that pipelined pairs are quick.
UPSTREAM_MS = 50


# --- the hedger, with fake attempts -------------------------------------------------


def _hanging(number: int, t0: float) -> Outcome:
    gevent.sleep(60)
    return Outcome(number, Kind.SUCCESS, 0.0, 60.0, status=200, body=b"{}")


def test_setting_cancel_kills_every_attempt_and_raises_cancelled() -> None:
    cancel = Event()
    running: list[int] = []

    def attempt(number: int, t0: float) -> Outcome:
        running.append(number)
        if len(running) == 3:  # the client leaves once every attempt is under way
            gevent.spawn(cancel.set)
        return _hanging(number, t0)

    pool = Pool(10)
    with pytest.raises(Cancelled) as caught:
        hedge(
            attempt,
            HedgePolicy(delay_s=0.3, fanout=2),
            pool=pool,
            deadline_s=60,
            cancel=cancel,
        )
    assert [o.kind for o in caught.value.result.outcomes] == [Kind.CANCELLED] * 3
    assert caught.value.result.elapsed_s < 0.3 + PROMPTLY_S
    assert pool.free_count() == pool.size


def test_a_request_cancelled_before_it_starts_starts_no_attempt() -> None:
    cancel = Event()
    cancel.set()
    with pytest.raises(Cancelled) as caught:
        hedge(
            _hanging,
            HedgePolicy(delay_s=0.3, fanout=2),
            pool=Pool(3),
            deadline_s=None,
            cancel=cancel,
        )  # fmt: skip
    assert caught.value.result.outcomes == ()


# --- the watcher, on a socket pair -----------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def test_the_watcher_sees_the_client_close(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    with ClientWatch(server) as watch:
        client.close()
        assert watch.gone.wait(PROMPTLY_S)


def test_a_pipelined_request_is_not_a_disconnect(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    with ClientWatch(server) as watch:
        client.sendall(b"GET /api/smart HTTP/1.1\r\n\r\n")
        assert not watch.gone.wait(0.1)
    # The bytes are still there for the server to read.
    assert server.recv(100).startswith(b"GET /api/smart")


def test_the_watcher_stops_at_the_end_of_the_request(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    with ClientWatch(server) as watch:
        pass
    client.close()
    assert not watch.gone.wait(0.1)


def test_without_a_socket_nothing_is_watched() -> None:
    with ClientWatch(None) as watch:
        assert not watch.gone.is_set()


# --- end to end: real gunicorn, the simulator ----------------------------------------


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(mode="fixed", fixed_ms=UPSTREAM_MS, failure_rate=0.0) as sim:
        yield sim


@pytest.fixture(scope="module")
def server(
    simulator: SimulatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    env = {"SMART_UPSTREAM_URL": simulator.work_url}
    with Gunicorn(env, workers=1, tmp_path=tmp_path_factory.mktemp("disconnect")) as gunicorn:
        yield gunicorn


def _requests_with_code(server: Gunicorn, code: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "smart_requests_total" and s.labels.get("code") == code
    )


def _calls(simulator: SimulatorProcess, request_id: str) -> list[dict[str, Any]]:
    return [c for c in simulator.stats()["recent"] if c["request_id"] == request_id]


def test_a_client_that_hangs_up_has_every_attempt_aborted_at_once(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.reset()
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    request_id = "leaves-early"
    client = socket.create_connection(("127.0.0.1", server.port))
    client.sendall(
        f"GET /api/smart HTTP/1.1\r\nHost: x\r\nX-Request-ID: {request_id}\r\n\r\n".encode()
    )
    assert wait_until(lambda: len(_calls(simulator, request_id)) == 3, ATTEMPTS_STARTED_WITHIN_S)
    closed_at = time.monotonic()
    client.close()
    assert wait_until(
        lambda: all(c["client_closed"] for c in _calls(simulator, request_id)), PROMPTLY_S
    )
    for call in _calls(simulator, request_id):
        assert call["client_closed_at"] - closed_at < ABORTED_WITHIN_S, call
    assert wait_until(lambda: scrape_total(server, "smart_requests_in_flight") == 0, PROMPTLY_S)
    assert wait_until(lambda: any(server.request_lines()), PROMPTLY_S)
    (line,) = [r for r in server.request_lines() if r["request_id"] == request_id]
    assert (line["status"], line["outcome"]) == (499, "client_closed")
    assert [a["outcome"] for a in line["attempts"]] == ["cancelled"] * 3  # type: ignore[index]
    assert _requests_with_code(server, "499") == 1


def test_a_pipelined_request_is_answered_not_taken_for_a_disconnect(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.reset()
    request = b"GET /api/smart HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(request + request)
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
            chunk = client.recv(65536)
            assert chunk, received
            received += chunk
    assert received.count(b"HTTP/1.1 200 ") == 2
    assert b" 499 " not in received
