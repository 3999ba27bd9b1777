"""The simulated upstream, over real sockets against a real child process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from simulator import SimulatorError, SimulatorProcess

FIXED_MS = 50
# A shared, loaded 2-core box: scheduling alone can add tens of milliseconds.
TIMING_SLACK_MS = 80
# Long enough for any socket read that should succeed; bounds every client call.
CLIENT_TIMEOUT_S = 5.0
# How long the simulator may take to record an event it should see at once.
EVENT_DEADLINE_S = 2.0
POLL_INTERVAL_S = 0.01
# Short enough to keep the file fast, long enough that a hang is not a slow answer.
HANG_PROBE_S = 0.3
# A cancelled call must be noticed well within the second the proxy's tests allow.
CLOSE_NOTICE_S = 1.0
# Stopping is immediate; the margin is for a loaded box.
STOP_DEADLINE_S = 3.0
FAST_KINDS = ["status_500", "status_503", "html", "bad_json"]
HTML = "text/html; charset=utf-8"
REQUEST = b"GET /api/work HTTP/1.1\r\nHost: upstream\r\n\r\n"


pytestmark = [
    pytest.mark.simulator(mode="fixed", fixed_ms=FIXED_MS, failure_rate=0),
    pytest.mark.usefixtures("clean_simulator"),
]


def get_work(
    simulator: SimulatorProcess, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", simulator.port, timeout=CLIENT_TIMEOUT_S)
    try:
        conn.request("GET", "/api/work", headers=headers or {})
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def raw_call(simulator: SimulatorProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", simulator.port), timeout=CLIENT_TIMEOUT_S)
    sock.sendall(REQUEST)
    return sock


def read_until_error(sock: socket.socket) -> tuple[bytes, type[BaseException] | None]:
    """Everything the server sent, and how the stream ended (None for a clean EOF)."""
    received = b""
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except OSError as exc:
            return received, type(exc)
        if not data:
            return received, None
        received += data
    raise AssertionError(f"stream still open after {CLIENT_TIMEOUT_S} s")


def wait_for_stats(
    simulator: SimulatorProcess, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + EVENT_DEADLINE_S
    while True:
        stats: dict[str, Any] = simulator.stats()
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"stats did not match within {EVENT_DEADLINE_S} s: {stats}")
        time.sleep(POLL_INTERVAL_S)


def last_call_closed(stats: dict[str, Any]) -> bool:
    return bool(stats["recent"]) and stats["recent"][-1]["client_closed"]


def test_fixed_mode_answers_a_valid_payload_after_the_fixed_delay(
    simulator: SimulatorProcess,
) -> None:
    started = time.monotonic()
    status, response, body = get_work(simulator)
    elapsed_ms = (time.monotonic() - started) * 1000

    assert status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("Content-Length") == str(len(body))
    payload = json.loads(body)
    assert FIXED_MS <= payload["time"] <= FIXED_MS + TIMING_SLACK_MS
    assert FIXED_MS <= elapsed_ms <= FIXED_MS + TIMING_SLACK_MS * 2


def test_random_mode_draws_latency_within_bounds_and_failures_from_the_kinds(
    simulator: SimulatorProcess,
) -> None:
    simulator.configure(mode="random", min_ms=10, max_ms=40, failure_rate=0)
    for _ in range(5):
        status, _, body = get_work(simulator)
        assert status == 200
        assert 10 <= json.loads(body)["time"] <= 40 + TIMING_SLACK_MS

    simulator.configure(failure_rate=1, failure_kinds=["status_503"])
    assert get_work(simulator)[0] == 503


def test_scripted_steps_are_consumed_in_order_before_the_default(
    simulator: SimulatorProcess,
) -> None:
    simulator.script(
        [
            {"kind": "status", "status": 503, "delay_ms": 10},
            {"kind": "wrong_type"},
            {"kind": "ok", "delay_ms": 120},
        ]
    )

    assert get_work(simulator)[0] == 503
    assert json.loads(get_work(simulator)[2]) == {"time": "12"}
    assert 120 <= json.loads(get_work(simulator)[2])["time"] <= 120 + TIMING_SLACK_MS
    assert FIXED_MS <= json.loads(get_work(simulator)[2])["time"] <= FIXED_MS + TIMING_SLACK_MS
    kinds = [call["kind"] for call in simulator.stats()["recent"]]
    assert kinds == ["status_503", "wrong_type", "ok", "ok"]


@pytest.mark.parametrize(
    ("step", "status", "content_type", "body"),
    [
        ({"kind": "status_500"}, 500, "application/json", b'{"error": "simulated", "status": 500}'),
        ({"kind": "status", "status": 404}, 404, "application/json", None),
        ({"kind": "status_429"}, 429, "application/json", None),
        ({"kind": "html"}, 200, HTML, None),
        ({"kind": "bad_json"}, 200, "application/json", b'{"time": 1'),
        ({"kind": "wrong_type"}, 200, "application/json", b'{"time": "12"}'),
        ({"kind": "empty_object"}, 200, "application/json", b"{}"),
        ({"kind": "float"}, 200, "application/json", b'{"time": 1.5}'),
        ({"kind": "bool"}, 200, "application/json", b'{"time": true}'),
        ({"kind": "negative"}, 200, "application/json", b'{"time": -1}'),
        ({"kind": "not_object"}, 200, "application/json", b"[1]"),
    ],
)
def test_complete_wrong_answers_are_well_framed_http(
    simulator: SimulatorProcess,
    step: dict[str, Any],
    status: int,
    content_type: str,
    body: bytes | None,
) -> None:
    simulator.script([step])
    got_status, response, got_body = get_work(simulator)

    assert got_status == status
    assert response.getheader("Content-Type") == content_type
    assert response.getheader("Content-Length") == str(len(got_body))
    if body is not None:
        assert got_body == body
    if status == 429:
        assert response.getheader("Retry-After") == "1"


def test_truncated_body_is_shorter_than_its_content_length(simulator: SimulatorProcess) -> None:
    simulator.script([{"kind": "truncated"}])
    with pytest.raises(http.client.IncompleteRead):
        get_work(simulator)


def test_huge_body_is_valid_json_of_the_requested_size(simulator: SimulatorProcess) -> None:
    simulator.script([{"kind": "huge"}, {"kind": "huge", "size": 5000}])

    _, _, body = get_work(simulator)
    assert len(body) == 1024 * 1024
    assert isinstance(json.loads(body)["time"], int)
    assert len(get_work(simulator)[2]) == 5000


def test_trickle_sends_a_valid_body_one_byte_per_interval(simulator: SimulatorProcess) -> None:
    interval_ms = 20
    simulator.script([{"kind": "trickle", "interval_ms": interval_ms}])
    started = time.monotonic()
    status, _, body = get_work(simulator)
    elapsed_ms = (time.monotonic() - started) * 1000

    assert status == 200
    assert isinstance(json.loads(body)["time"], int)
    assert elapsed_ms >= (len(body) - 1) * interval_ms


def test_endless_body_keeps_coming_until_the_client_leaves(simulator: SimulatorProcess) -> None:
    simulator.script([{"kind": "endless"}])
    conn = http.client.HTTPConnection("127.0.0.1", simulator.port, timeout=CLIENT_TIMEOUT_S)
    conn.request("GET", "/api/work")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert len(response.read(32 * 1024)) == 32 * 1024
    conn.close()

    stats = wait_for_stats(simulator, last_call_closed)
    assert stats["in_flight"] == 0


@pytest.mark.parametrize(
    ("kind", "received", "ending"),
    [
        ("reset", b"", ConnectionResetError),
        ("reset_mid_headers", b"HTTP/1.1 200 OK\r\nContent-Type: appl", ConnectionResetError),
        ("garbage", b"\x16\x03\x01", None),
        ("close", b"", None),
    ],
)
def test_broken_connections_end_as_their_kind_says(
    simulator: SimulatorProcess, kind: str, received: bytes, ending: type[BaseException] | None
) -> None:
    simulator.script([{"kind": kind}])
    with raw_call(simulator) as sock:
        got, got_ending = read_until_error(sock)
    assert got.startswith(received)
    assert got_ending is ending


def test_reset_mid_body_sends_headers_and_half_the_body(simulator: SimulatorProcess) -> None:
    simulator.script([{"kind": "reset_mid_body"}])
    with raw_call(simulator) as sock:
        got, ending = read_until_error(sock)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert 0 < len(body) < length
    assert ending is ConnectionResetError


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("reset", ConnectionResetError),
        ("reset_mid_headers", ConnectionResetError),
        ("reset_mid_body", ConnectionResetError),
        ("garbage", http.client.BadStatusLine),
        ("close", http.client.RemoteDisconnected),
    ],
)
def test_http_clients_see_broken_connections_as_errors(
    simulator: SimulatorProcess, kind: str, error: type[Exception]
) -> None:
    simulator.script([{"kind": kind}])
    with pytest.raises(error):
        get_work(simulator)


def test_hang_never_answers_and_notices_the_client_leaving(simulator: SimulatorProcess) -> None:
    simulator.script([{"kind": "hang"}])
    with raw_call(simulator) as sock:
        sock.settimeout(HANG_PROBE_S)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert simulator.stats()["in_flight"] == 1

    stats = wait_for_stats(simulator, last_call_closed)
    assert stats["in_flight"] == 0
    assert stats["recent"][-1]["kind"] == "hang"


def test_client_leaving_during_the_delay_is_recorded_and_the_call_abandoned(
    simulator: SimulatorProcess,
) -> None:
    simulator.script([{"kind": "ok", "delay_ms": 10_000}])
    sock = raw_call(simulator)
    wait_for_stats(simulator, lambda stats: stats["in_flight"] == 1)
    sock.close()
    closed_at = time.monotonic()

    stats = wait_for_stats(simulator, last_call_closed)
    call = stats["recent"][-1]
    # Both sides read CLOCK_MONOTONIC, which is one clock for the whole host.
    assert call["client_closed_at"] - closed_at < CLOSE_NOTICE_S
    assert call["ended"] == call["client_closed_at"]
    assert stats["in_flight"] == 0
    assert stats["client_closed"] == 1
    # Only the connection asking for the stats is still open.
    wait_for_stats(simulator, lambda stats: stats["connections_open"] == 1)


def test_by_attempt_behaviour_is_sticky_and_yields_to_scripted_steps(
    simulator: SimulatorProcess,
) -> None:
    simulator.by_attempt({1: {"kind": "status", "status": 503}, "2": {"kind": "ok", "delay_ms": 0}})

    assert get_work(simulator, {"X-Smart-Attempt": "1"})[0] == 503
    assert json.loads(get_work(simulator, {"X-Smart-Attempt": "2"})[2])["time"] < FIXED_MS
    assert get_work(simulator, {"X-Smart-Attempt": "1"})[0] == 503
    assert json.loads(get_work(simulator, {"X-Smart-Attempt": "3"})[2])["time"] >= FIXED_MS
    simulator.script([{"kind": "html"}])
    assert get_work(simulator, {"X-Smart-Attempt": "1"})[1].getheader("Content-Type") == HTML

    simulator.reset()
    assert get_work(simulator, {"X-Smart-Attempt": "1"})[0] == 200


def test_stats_count_work_calls_and_not_control_requests(simulator: SimulatorProcess) -> None:
    headers = {"X-Request-ID": "req-1", "X-Smart-Attempt": "2", "traceparent": "00-ab-cd-01"}
    get_work(simulator, headers)
    get_work(simulator)
    simulator.config()
    simulator.script([])
    conn = http.client.HTTPConnection("127.0.0.1", simulator.port, timeout=CLIENT_TIMEOUT_S)
    conn.request("GET", "/elsewhere")
    missing = conn.getresponse()
    assert missing.status == 404
    assert json.loads(missing.read())["error"] == "not_found"
    conn.close()

    stats = simulator.stats()
    assert (stats["calls"], stats["completed"], stats["in_flight"]) == (2, 2, 0)
    assert stats["calls_by_attempt"] == {"2": 1, "none": 1}
    first, second = stats["recent"]
    assert (first["id"], first["request_id"], first["attempt"]) == (1, "req-1", "2")
    assert first["traceparent"] == "00-ab-cd-01"
    assert (second["request_id"], second["attempt"], second["traceparent"]) == (None, None, None)
    assert first["started"] < first["ended"] <= second["started"] < second["ended"]
    assert not first["client_closed"]


def test_keep_alive_serves_many_calls_on_one_connection(simulator: SimulatorProcess) -> None:
    simulator.script([{"kind": "ok"}, {"kind": "status_503"}, {"kind": "ok"}])
    before = simulator.stats()["connections_total"]
    conn = http.client.HTTPConnection("127.0.0.1", simulator.port, timeout=CLIENT_TIMEOUT_S)
    statuses = []
    for _ in range(3):
        conn.request("GET", "/api/work")
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    conn.close()

    assert statuses == [200, 503, 200]
    # One connection for the three calls, one for this stats request.
    assert simulator.stats()["connections_total"] - before == 2


def test_pipelined_requests_are_answered_in_order(simulator: SimulatorProcess) -> None:
    simulator.script([{"kind": "ok", "delay_ms": 300}, {"kind": "status_503"}])
    with raw_call(simulator) as sock:
        wait_for_stats(simulator, lambda stats: stats["in_flight"] == 1)
        # Arrives while the first call sleeps: the socket turns readable with data.
        sock.sendall(REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        got, ending = read_until_error(sock)

    first, second = got.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK")
    assert json.loads(first.partition(b"\r\n\r\n")[2])["time"] >= 300
    assert second.startswith(b"503 Service Unavailable")
    assert ending is None
    assert not simulator.stats()["recent"][0]["client_closed"]


def test_a_seed_replays_the_same_sequence(simulator: SimulatorProcess) -> None:
    options: dict[str, Any] = {
        "mode": "random",
        "min_ms": 0,
        "max_ms": 5,
        "failure_rate": 0.5,
        "failure_kinds": FAST_KINDS,
        "seed": 1234,
    }

    def sequence(process: SimulatorProcess) -> list[str]:
        for _ in range(12):
            get_work(process)
        return [call["kind"] for call in process.stats()["recent"]]

    simulator.configure(**options)
    first = sequence(simulator)
    simulator.reset()
    assert sequence(simulator) == first
    assert len(set(first)) > 2
    with SimulatorProcess(**options) as other:
        assert sequence(other) == first


def test_invalid_control_requests_are_400_and_change_nothing(
    simulator: SimulatorProcess, simulator_baseline: dict[str, Any]
) -> None:
    bad_requests: list[tuple[str, object]] = [
        ("/_sim/config", {"min_ms": 700}),
        ("/_sim/config", {"port": 9}),
        ("/_sim/config", {"failure_kinds": ["status_500", "teapot"]}),
        ("/_sim/config", {"failure_rate": 1.5}),
        ("/_sim/script", {"steps": [{"kind": "ok"}, {"kind": "teapot"}]}),
        ("/_sim/script", {"steps": [{"kind": "ok", "delay": 5}]}),
        ("/_sim/script", {"by_attempt": {"1": {"kind": "status", "status": 999}}}),
        ("/_sim/script", {}),
    ]
    for path, body in bad_requests:
        with pytest.raises(SimulatorError, match="400"):
            simulator.request("POST", path, body)

    assert simulator.config()["min_ms"] == simulator_baseline["min_ms"]
    assert simulator.stats()["pending_steps"] == 0


def test_options_come_from_the_command_line_then_the_environment() -> None:
    env = {"SIMULATOR_FIXED_MS": "30", "SIMULATOR_FAILURE_RATE": "0.5"}
    with SimulatorProcess(env=env, mode="fixed", fixed_ms=40) as process:
        config = process.config()
    assert (config["mode"], config["fixed_ms"], config["failure_rate"]) == ("fixed", 40, 0.5)


def test_invalid_options_stop_the_simulator_before_it_listens() -> None:
    with pytest.raises(SimulatorError, match="exited with 2"):
        SimulatorProcess(min_ms=500, max_ms=100).start()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_exits_cleanly_even_with_a_call_hanging(signum: int) -> None:
    with SimulatorProcess(failure_rate=0) as process:
        process.script([{"kind": "hang"}])
        with raw_call(process):
            wait_for_stats(process, lambda stats: stats["in_flight"] == 1)
            assert process.pid is not None
            os.kill(process.pid, signum)
            assert process.wait(STOP_DEADLINE_S) == 0


def exchange(simulator: SimulatorProcess, data: bytes) -> tuple[bytes, bool]:
    """Send raw bytes; everything answered, and whether the server then closed."""
    with socket.create_connection(("127.0.0.1", simulator.port), timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(data)
        sock.settimeout(HANG_PROBE_S)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False
            if not chunk:
                return received, True
            received += chunk


@pytest.mark.parametrize(
    ("request_head", "closed"),
    [
        (b"GET /api/work HTTP/1.1\r\nHost: upstream\r\n\r\n", False),
        (b"GET /api/work HTTP/1.1\r\nConnection: close\r\n\r\n", True),
        (b"GET /api/work HTTP/1.0\r\n\r\n", True),
        (b"GET /api/work HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", False),
        (b"GET /api/work?q=1 HTTP/1.1\nHost: upstream\n\n", False),
    ],
)
def test_connections_persist_as_the_http_version_and_connection_header_say(
    simulator: SimulatorProcess, request_head: bytes, closed: bool
) -> None:
    got, got_closed = exchange(simulator, request_head)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n")
    assert (b"Connection: close\r\n" in got) is closed
    assert got_closed is closed


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00 not http\r\n\r\n",
        b"GET /api/work HTTP/2.0\r\n\r\n",
        b"GET /api/work HTTP/1.1\r\nNo Colon Here\r\n\r\n",
        b"GET /api/work HTTP/1.1\r\nHost: a\r\n folded: b\r\n\r\n",
        b"POST /_sim/script HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /_sim/script HTTP/1.1\r\nContent-Length: 2097152\r\n\r\n",
        b"POST /_sim/script HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /api/work HTTP/1.1\r\nX-Long: " + b"a" * 70_000,
    ],
)
def test_requests_that_cannot_be_framed_are_400_and_the_connection_closed(
    simulator: SimulatorProcess, data: bytes
) -> None:
    got, closed = exchange(simulator, data)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert json.loads(body)["error"] == "bad_request"
    assert closed
    assert simulator.stats()["calls"] == 0


def read_until_error_or_idle(sock: socket.socket) -> tuple[bytes, type[BaseException] | None]:
    """Like read_until_error, but a connection kept open ends the read after a pause."""
    sock.settimeout(HANG_PROBE_S)
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return received, None
        except OSError as exc:
            return received, type(exc)
        if not data:
            return received, None
        received += data


def test_control_bodies_may_come_in_pieces_after_100_continue(simulator: SimulatorProcess) -> None:
    body = json.dumps({"steps": [{"kind": "html"}]}).encode()
    head = b"POST /_sim/script HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
    with socket.create_connection(("127.0.0.1", simulator.port), timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(head % len(body))
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body[:5])
        time.sleep(POLL_INTERVAL_S)
        sock.sendall(body[5:] + REQUEST)
        got, ending = read_until_error_or_idle(sock)
    first, second = got.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK") and b'"pending_steps": 1' in first
    assert second.startswith(b"200 OK") and b"Content-Type: " + HTML.encode() in second
    assert ending is None
