"""The whole service over real sockets: gunicorn's gevent workers in front of the
simulated upstream in its own process, both on 127.0.0.1.

Every test runs twice: against a plain-HTTP upstream and against an HTTPS one whose
certificate comes from a CA made for the run (the production upstream is HTTPS).
Timing is read from the simulator's own record of when each attempt arrived, so the
test measures what the upstream saw, not what the test process happened to notice.
TLS-only behaviour (trust, resumption, handshake faults) is in test_tls*.py.
"""

from __future__ import annotations

import statistics
from typing import Any

import gevent
import pytest
import requests
from gevent.pool import Pool

from simulator.process import SimulatorProcess
from tests.support import Gunicorn, Servers, open_fds, wait_until

#: The hedge delay under test (the contract's 300 ms).
HEDGE_DELAY_S = 0.3
#: How far from its due time an event may be seen on a loaded 2-core CI box. The
#: contract's conformance check allows ±40 ms; scheduling stalls on a shared machine
#: running gunicorn, the simulator and the tests at once reach beyond that.
TOLERANCE_S = 0.1
#: The contract's conformance check: hedges within 40 ms of the delay. Single
#: requests get ``TOLERANCE_S`` (a stall can hit any one); the median of
#: ``HEDGE_SAMPLES`` holds to this.
CONFORMANCE_TOLERANCE_S = 0.04
HEDGE_SAMPLES = 5
#: The contract: leftover attempts' connections are closed within 1 s of the answer.
CANCEL_WITHIN_S = 1.0
#: Requests per leak check; enough for pools and caches to reach their steady state.
LEAK_REQUESTS = 300
#: Descriptors a worker may hold above its baseline after the load: idle keep-alive
#: connections to the upstream kept for reuse (bounded by the pool) and the like.
FD_SLACK = 40


pytestmark = [
    pytest.mark.parametrize(
        "simulator", [{}, {"tls": True}], ids=["http", "https"], indirect=True, scope="module"
    ),
    pytest.mark.usefixtures("clean_simulator"),
]


def upstream_env(simulator: SimulatorProcess, **settings: str) -> dict[str, str]:
    """smart's settings for this simulator: its URL and, over HTTPS, the run's CA."""
    env = {"SMART_UPSTREAM_URL": simulator.work_url, **settings}
    if simulator.tls:
        env["SMART_UPSTREAM_CA_BUNDLE"] = simulator.ca_path
    return env


@pytest.fixture(scope="module")
def server(simulator: SimulatorProcess, module_servers: Servers) -> Gunicorn:
    return module_servers.start(upstream_env(simulator), workers=2)


def get(server: Gunicorn, query: str = "", **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", 10)
    return requests.get(f"{server.url}/api/smart{query}", **kwargs)


def calls_by_attempt(simulator: SimulatorProcess, request_id: str) -> dict[int, dict[str, Any]]:
    calls = simulator.stats()["recent"]
    return {int(c["attempt"]): c for c in calls if c["request_id"] == request_id}


def assert_error_shape(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "message", "request_id", "attempts"}
    assert body["error"] == code
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


# --- the happy path ----------------------------------------------------------------


def test_a_fast_first_attempt_is_the_answer_and_nothing_else_is_sent(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    response = get(server, "?timeout=1000", headers={"X-Request-ID": "happy-1"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    payload = response.json()
    assert set(payload) == {"time"} and isinstance(payload["time"], int)
    assert response.headers["X-Request-ID"] == "happy-1"
    assert response.headers["X-Smart-Attempts"] == "1"
    assert response.headers["X-Smart-Winner"] == "1"
    assert "total;dur=" in response.headers["Server-Timing"]
    assert list(calls_by_attempt(simulator, "happy-1")) == [1]


def test_the_body_is_the_upstreams_payload_unchanged(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.script([{"kind": "ok", "delay_ms": 10}])
    response = get(server)
    assert response.status_code == 200
    assert response.json() == {"time": response.json()["time"]}


def test_a_generated_request_id_is_sent_to_every_attempt(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt({"1": {"kind": "status", "status": 503, "delay_ms": 5}})
    response = get(server, headers={"X-Request-ID": "bad id with spaces"})
    request_id = response.headers["X-Request-ID"]
    assert request_id != "bad id with spaces"
    assert sorted(calls_by_attempt(simulator, request_id)) == [1, 2, 3]


# --- the timeline ------------------------------------------------------------------


def test_hedges_start_at_the_delay_when_the_first_attempt_is_slow(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt(
        {
            "1": {"kind": "ok", "delay_ms": 2000},
            "2": {"kind": "ok", "delay_ms": 100},
            "3": {"kind": "ok", "delay_ms": 100},
        }
    )
    offsets = []
    for n in range(HEDGE_SAMPLES):
        request_id = f"slow-first-{n}"
        response = get(server, "?timeout=5000", headers={"X-Request-ID": request_id})
        assert response.status_code == 200, response.text
        assert response.headers["X-Smart-Attempts"] == "3"
        assert response.headers["X-Smart-Winner"] in {"2", "3"}
        calls = calls_by_attempt(simulator, request_id)
        for hedge in (2, 3):
            offset = calls[hedge]["started"] - calls[1]["started"]
            assert HEDGE_DELAY_S - TOLERANCE_S / 4 <= offset <= HEDGE_DELAY_S + TOLERANCE_S
            offsets.append(offset)
    assert abs(statistics.median(offsets) - HEDGE_DELAY_S) <= CONFORMANCE_TOLERANCE_S


def test_hedges_start_at_once_when_the_first_attempt_fails(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt(
        {
            "1": {"kind": "status", "status": 500, "delay_ms": 30},
            "2": {"kind": "ok", "delay_ms": 50},
            "3": {"kind": "ok", "delay_ms": 50},
        }
    )
    response = get(server, headers={"X-Request-ID": "early-fail"})
    assert response.status_code == 200
    calls = calls_by_attempt(simulator, "early-fail")
    for hedge in (2, 3):
        offset = calls[hedge]["started"] - calls[1]["started"]
        assert offset <= 0.03 + TOLERANCE_S < HEDGE_DELAY_S


def test_all_attempts_failing_is_a_502_answered_at_once(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt(
        {str(n): {"kind": "status", "status": 503, "delay_ms": 20} for n in (1, 2, 3)}
    )
    response = get(server, "?timeout=10000")
    body = assert_error_shape(response, 502, "upstream_failed")
    assert [a["outcome"] for a in body["attempts"]] == ["http_503"] * 3
    assert response.elapsed.total_seconds() < HEDGE_DELAY_S + TOLERANCE_S


@pytest.mark.parametrize("timeout_ms", [50, 250, 1000])
def test_the_answer_comes_by_the_timeout_when_no_attempt_succeeds(
    server: Gunicorn, simulator: SimulatorProcess, timeout_ms: int
) -> None:
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    response = get(server, f"?timeout={timeout_ms}")
    body = assert_error_shape(response, 504, "upstream_timeout")
    assert f"{timeout_ms} ms" in body["message"]
    took = response.elapsed.total_seconds()
    assert timeout_ms / 1000 <= took + 0.005 <= timeout_ms / 1000 + TOLERANCE_S
    expected_attempts = 3 if timeout_ms > HEDGE_DELAY_S * 1000 else 1
    assert len(body["attempts"]) == expected_attempts
    assert {a["outcome"] for a in body["attempts"]} == {"cancelled"}


def test_a_timeout_below_the_delay_still_hedges_when_the_first_attempt_fails_early(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt(
        {
            "1": {"kind": "reset", "delay_ms": 10},
            "2": {"kind": "ok", "delay_ms": 30},
            "3": {"kind": "ok", "delay_ms": 30},
        }
    )
    response = get(server, "?timeout=200")
    assert response.status_code == 200
    assert response.headers["X-Smart-Attempts"] == "3"


# --- every failure kind is a failed attempt ----------------------------------------

FAILURES = [
    ({"kind": "status", "status": 500}, "http_500"),
    ({"kind": "status", "status": 503}, "http_503"),
    ({"kind": "status", "status": 429}, "http_429"),
    ({"kind": "status", "status": 404}, "http_404"),
    ({"kind": "html"}, "invalid_payload"),
    ({"kind": "bad_json"}, "invalid_payload"),
    ({"kind": "wrong_type"}, "invalid_payload"),
    ({"kind": "empty_object"}, "invalid_payload"),
    ({"kind": "float"}, "invalid_payload"),
    ({"kind": "bool"}, "invalid_payload"),
    ({"kind": "negative"}, "invalid_payload"),
    ({"kind": "not_object"}, "invalid_payload"),
    ({"kind": "huge", "size": 1_000_000}, "body_too_large"),
    ({"kind": "truncated"}, "reset"),
    ({"kind": "reset"}, "reset"),
    ({"kind": "reset_mid_headers"}, "reset"),
    ({"kind": "reset_mid_body"}, "reset"),
    ({"kind": "garbage"}, "reset"),
    ({"kind": "close"}, "reset"),
]


@pytest.mark.parametrize(
    ("behaviour", "outcome"),
    FAILURES,
    ids=[o[0]["kind"] + str(o[0].get("status", "")) for o in FAILURES],
)
def test_each_failure_kind_fails_the_attempt_and_a_hedge_rescues_it(
    server: Gunicorn, simulator: SimulatorProcess, behaviour: dict[str, Any], outcome: str
) -> None:
    simulator.by_attempt({"1": {**behaviour, "delay_ms": 10}})
    response = get(server, "?timeout=2000", headers={"X-Request-ID": "kind-" + outcome})
    assert response.status_code == 200, response.text
    assert response.headers["X-Smart-Winner"] in {"2", "3"}
    assert isinstance(response.json()["time"], int)

    simulator.reset()
    simulator.by_attempt({str(n): {**behaviour, "delay_ms": 10} for n in (1, 2, 3)})
    response = get(server, "?timeout=2000")
    body = assert_error_shape(response, 502, "upstream_failed")
    assert [a["outcome"] for a in body["attempts"]] == [outcome] * 3


# --- cancellation ------------------------------------------------------------------


def test_losing_attempts_are_cancelled_and_their_connections_closed(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt(
        {
            "1": {"kind": "ok", "delay_ms": 3000},
            "2": {"kind": "ok", "delay_ms": 50},
            "3": {"kind": "hang"},
        }
    )
    response = get(server, headers={"X-Request-ID": "cancel-1"})
    assert response.status_code == 200
    assert response.headers["X-Smart-Winner"] == "2"

    def losers_closed() -> bool:
        calls = calls_by_attempt(simulator, "cancel-1")
        return all(calls[n]["client_closed"] for n in (1, 3))

    assert wait_until(losers_closed, CANCEL_WITHIN_S)


def test_a_deadline_cancels_every_attempt_and_closes_their_connections(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    response = get(server, "?timeout=400", headers={"X-Request-ID": "cancel-2"})
    assert response.status_code == 504

    def all_closed() -> bool:
        calls = calls_by_attempt(simulator, "cancel-2")
        return len(calls) == 3 and all(c["client_closed"] for c in calls.values())

    assert wait_until(all_closed, CANCEL_WITHIN_S)


# --- the HTTP edge -----------------------------------------------------------------

INVALID_TIMEOUTS = [
    "?timeout=",
    "?timeout",
    "?timeout=abc",
    "?timeout=1.5",
    "?timeout=-5",
    "?timeout=0",
    "?timeout=%2B5",
    "?timeout=%205",
    "?timeout=60001",
    "?timeout=1&timeout=2",
    "?timeout=%D9%A5",
    "?timeout=" + "9" * 400,
]


@pytest.mark.parametrize("query", INVALID_TIMEOUTS)
def test_an_invalid_timeout_is_a_400_that_names_the_parameter(
    server: Gunicorn, simulator: SimulatorProcess, query: str
) -> None:
    body = assert_error_shape(get(server, query), 400, "invalid_timeout")
    assert "'timeout'" in body["message"]
    assert simulator.stats()["calls"] == 0


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("GET", "/api/smart/extra", 404, "not_found"),
        ("POST", "/api/smart", 405, "method_not_allowed"),
        ("DELETE", "/api/smart", 405, "method_not_allowed"),
        ("OPTIONS", "/api/smart", 405, "method_not_allowed"),
    ],
)
def test_other_routes_and_methods_answer_in_the_same_json_shape(
    server: Gunicorn, method: str, path: str, status: int, code: str
) -> None:
    response = requests.request(method, server.url + path, timeout=10)
    assert_error_shape(response, status, code)
    if status == 405:
        assert "GET" in response.headers["Allow"]


def test_health_never_touches_the_upstream(server: Gunicorn, simulator: SimulatorProcess) -> None:
    for path in ("/healthz", "/readyz"):
        response = requests.get(server.url + path, timeout=10)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
    assert simulator.stats()["calls"] == 0


# --- no upstream timeout means every attempt is still bounded -----------------------


@pytest.fixture(scope="module")
def bounded_server(simulator: SimulatorProcess, module_servers: Servers) -> Gunicorn:
    env = upstream_env(simulator, SMART_ATTEMPT_TIMEOUT_MS="600", SMART_HEDGE_DELAY_MS="30")
    return module_servers.start(env, workers=2)


def test_without_a_timeout_a_hanging_upstream_still_ends_in_a_504(
    bounded_server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    response = get(bounded_server)
    body = assert_error_shape(response, 504, "upstream_timeout")
    assert [a["outcome"] for a in body["attempts"]] == ["timeout"] * 3
    # The last attempts start at the 30 ms hedge and end at their own 600 ms limit;
    # what matters here is that the request ends at all, so the margin is generous.
    assert response.elapsed.total_seconds() <= 0.03 + 0.6 + 5 * TOLERANCE_S


def test_a_refused_upstream_is_a_prompt_502(servers: Servers) -> None:
    srv = servers.start({"SMART_UPSTREAM_URL": "http://127.0.0.1:9/api/work"})
    body = assert_error_shape(get(srv, "?timeout=5000"), 502, "upstream_failed")
    assert [a["outcome"] for a in body["attempts"]] == ["connect_error"] * 3


# --- nothing leaks ------------------------------------------------------------------


def test_hundreds_of_mixed_requests_leave_no_descriptors_or_connections_behind(
    bounded_server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.configure(mode="random", min_ms=5, max_ms=80, failure_rate=0.3, seed=7)
    pids = bounded_server.worker_pids()
    warmup = Pool(20)
    for _ in range(40):
        warmup.spawn(get, bounded_server, "?timeout=60")
    warmup.join(timeout=30)
    baseline = {pid: open_fds(pid) for pid in pids}

    pool = Pool(30)
    statuses: list[int] = []
    for n in range(LEAK_REQUESTS):
        query = ["", "?timeout=40", "?timeout=500", "?timeout=1&timeout=2"][n % 4]
        pool.spawn(lambda q=query: statuses.append(get(bounded_server, q).status_code))
    assert pool.join(timeout=120), "load did not finish"
    assert len(statuses) == LEAK_REQUESTS
    assert set(statuses) <= {200, 400, 502, 504}

    def settled() -> bool:
        stats = simulator.stats()
        return stats["in_flight"] == 0

    assert wait_until(settled, CANCEL_WITHIN_S * 3)
    for pid in pids:
        assert open_fds(pid) <= baseline[pid] + FD_SLACK
    stats = simulator.stats()
    # Open upstream connections are only the idle keep-alive ones the pools keep.
    assert stats["connections_open"] <= 2 * 30 * 3
    gevent.sleep(0)
