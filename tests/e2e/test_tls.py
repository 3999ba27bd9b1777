"""The production path is HTTPS: the service's core behaviour over TLS, under gunicorn.

The simulator serves HTTPS with a certificate from a CA made for the run, and smart
trusts that CA through SMART_UPSTREAM_CA_BUNDLE only. Timing is read from the
simulator's record of when each attempt arrived, after its TLS handshake.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from gevent.pool import Pool

from simulator import SimulatorError, SimulatorProcess
from smart.config import Settings
from smart.upstream.client import UpstreamClient
from tests.support import Gunicorn, open_fds, wait_until

HEDGE_DELAY_S = 0.3
#: What one request's hedge offset may be off by on a loaded shared 2-core box (as in
#: test_service.py): scheduling stalls there reach past the contract's ±40 ms.
TOLERANCE_S = 0.1
#: The contract's own tolerance, held by the median of several requests: one stall
#: moves one request, not the middle of them.
CONFORMANCE_TOLERANCE_S = 0.04
HEDGE_SAMPLES = 5
#: The contract: leftover attempts' connections are closed within 1 s of the answer.
CANCEL_WITHIN_S = 1.0
LEAK_REQUESTS = 200
#: Idle keep-alive connections the pool keeps, and the like (as in test_service.py).
FD_SLACK = 40


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(tls=True, mode="fixed", fixed_ms=20, failure_rate=0.0) as sim:
        yield sim


@pytest.fixture(scope="module")
def server(
    simulator: SimulatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    env = {
        "SMART_UPSTREAM_URL": simulator.work_url,
        "SMART_UPSTREAM_CA_BUNDLE": simulator.ca_path,
        "SMART_ATTEMPT_TIMEOUT_MS": "1500",
    }
    with Gunicorn(env, tmp_path=tmp_path_factory.mktemp("tls")) as gunicorn:
        yield gunicorn


@pytest.fixture(autouse=True)
def clean_simulator(simulator: SimulatorProcess) -> None:
    simulator.reset()
    simulator.configure(mode="fixed", fixed_ms=20, failure_rate=0.0)


def get(server: Gunicorn, query: str = "", **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", 10)
    return requests.get(f"{server.url}/api/smart{query}", **kwargs)


def calls_by_attempt(simulator: SimulatorProcess, request_id: str) -> dict[int, dict[str, Any]]:
    calls = simulator.stats()["recent"]
    return {int(c["attempt"]): c for c in calls if c["request_id"] == request_id}


def test_the_upstream_is_really_https(simulator: SimulatorProcess) -> None:
    assert simulator.work_url.startswith("https://")
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(simulator.work_url, timeout=5)  # certifi does not know the run's CA
    assert requests.get(simulator.work_url, verify=simulator.ca_path, timeout=5).ok


def test_the_simulators_tls_is_fixed_at_start(simulator: SimulatorProcess) -> None:
    assert simulator.config()["tls"] is True
    simulator.configure(tls=True)  # what it reports: no change, so allowed
    with pytest.raises(SimulatorError, match="tls"):
        simulator.configure(tls=False)


def test_a_fast_answer_over_tls_is_the_answer(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    response = get(server, "?timeout=1000", headers={"X-Request-ID": "tls-happy"})
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["time"], int)
    assert response.headers["X-Smart-Attempts"] == "1"
    assert list(calls_by_attempt(simulator, "tls-happy")) == [1]
    assert simulator.stats()["tls_handshakes"] >= 1


def test_hedges_over_tls_start_at_300_ms(server: Gunicorn, simulator: SimulatorProcess) -> None:
    simulator.by_attempt(
        {
            "1": {"kind": "ok", "delay_ms": 2000},
            "2": {"kind": "ok", "delay_ms": 100},
            "3": {"kind": "ok", "delay_ms": 100},
        }
    )
    offsets = []
    for n in range(HEDGE_SAMPLES):
        request_id = f"tls-slow-{n}"
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


def test_an_early_failure_over_tls_starts_the_hedges_at_once_and_one_wins(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt(
        {
            "1": {"kind": "status", "status": 500, "delay_ms": 30},
            "2": {"kind": "ok", "delay_ms": 50},
            "3": {"kind": "ok", "delay_ms": 50},
        }
    )
    response = get(server, headers={"X-Request-ID": "tls-early"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Smart-Winner"] in {"2", "3"}
    calls = calls_by_attempt(simulator, "tls-early")
    for hedge in (2, 3):
        assert calls[hedge]["started"] - calls[1]["started"] <= 0.03 + TOLERANCE_S


@pytest.mark.parametrize(
    ("behaviour", "outcome"),
    [
        ({"kind": "status", "status": 503}, "http_503"),
        ({"kind": "bad_json"}, "invalid_payload"),
        ({"kind": "reset"}, "reset"),
        ({"kind": "truncated"}, "reset"),
        ({"kind": "close"}, "reset"),
    ],
)
def test_failures_over_tls_keep_their_kind(
    server: Gunicorn, simulator: SimulatorProcess, behaviour: dict[str, Any], outcome: str
) -> None:
    simulator.by_attempt({str(n): {**behaviour, "delay_ms": 10} for n in (1, 2, 3)})
    response = get(server, "?timeout=2000")
    assert response.status_code == 502, response.text
    assert [a["outcome"] for a in response.json()["attempts"]] == [outcome] * 3


@pytest.mark.parametrize("timeout_ms", [50, 250, 1000])
def test_a_deadline_over_tls_is_a_504_on_time(
    server: Gunicorn, simulator: SimulatorProcess, timeout_ms: int
) -> None:
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    response = get(server, f"?timeout={timeout_ms}")
    assert response.status_code == 504
    assert f"{timeout_ms} ms" in response.json()["message"]
    took = response.elapsed.total_seconds()
    assert timeout_ms / 1000 <= took + 0.005 <= timeout_ms / 1000 + TOLERANCE_S
    expected_attempts = 3 if timeout_ms > HEDGE_DELAY_S * 1000 else 1
    assert [a["outcome"] for a in response.json()["attempts"]] == ["cancelled"] * expected_attempts


def test_a_timeout_below_the_delay_over_tls_still_hedges_after_an_early_failure(
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
    assert response.status_code == 200, response.text
    assert response.headers["X-Smart-Attempts"] == "3"


def test_without_a_timeout_a_hanging_tls_upstream_ends_at_the_attempt_limit(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    response = get(server)
    assert response.status_code == 504
    assert [a["outcome"] for a in response.json()["attempts"]] == ["timeout"] * 3


def test_losers_over_tls_are_cancelled_and_the_upstream_sees_them_close(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt(
        {
            "1": {"kind": "ok", "delay_ms": 3000},
            "2": {"kind": "ok", "delay_ms": 50},
            "3": {"kind": "hang"},
        }
    )
    response = get(server, headers={"X-Request-ID": "tls-cancel"})
    assert response.status_code == 200
    assert response.headers["X-Smart-Winner"] == "2"

    def losers_closed() -> bool:
        calls = calls_by_attempt(simulator, "tls-cancel")
        return all(calls[n]["client_closed"] for n in (1, 3))

    assert wait_until(losers_closed, CANCEL_WITHIN_S)


def test_a_deadline_over_tls_closes_every_attempts_connection(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    response = get(server, "?timeout=400", headers={"X-Request-ID": "tls-cancel-all"})
    assert response.status_code == 504

    def all_closed() -> bool:
        calls = calls_by_attempt(simulator, "tls-cancel-all")
        return len(calls) == 3 and all(c["client_closed"] for c in calls.values())

    assert wait_until(all_closed, CANCEL_WITHIN_S)


def test_hundreds_of_mixed_tls_requests_leave_nothing_behind(
    server: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.configure(mode="random", min_ms=5, max_ms=80, failure_rate=0.3, seed=11)
    pids = server.worker_pids()
    warmup = Pool(20)
    for _ in range(40):
        warmup.spawn(get, server, "?timeout=60")
    assert warmup.join(timeout=30), "warm-up did not finish"
    baseline = {pid: open_fds(pid) for pid in pids}

    pool = Pool(30)
    statuses: list[int] = []
    for n in range(LEAK_REQUESTS):
        query = ["", "?timeout=40", "?timeout=500"][n % 3]
        pool.spawn(lambda q=query: statuses.append(get(server, q).status_code))
    assert pool.join(timeout=120), "load did not finish"
    assert len(statuses) == LEAK_REQUESTS
    assert set(statuses) <= {200, 502, 504}
    assert wait_until(lambda: simulator.stats()["in_flight"] == 0, CANCEL_WITHIN_S * 3)
    for pid in pids:
        assert open_fds(pid) <= baseline[pid] + FD_SLACK
    assert simulator.stats()["connections_open"] <= 2 * 30 * 3


@pytest.fixture(scope="module")
def untrusting_server(
    simulator: SimulatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    env = {"SMART_UPSTREAM_URL": simulator.work_url}  # no bundle: certifi's CAs only
    with Gunicorn(env, workers=1, tmp_path=tmp_path_factory.mktemp("untrusting")) as gunicorn:
        yield gunicorn


def test_without_the_bundle_every_attempt_is_a_tls_error(
    untrusting_server: Gunicorn, simulator: SimulatorProcess
) -> None:
    response = get(untrusting_server, "?timeout=2000", headers={"X-Request-ID": "tls-nobundle"})
    assert response.status_code == 502, response.text
    assert [a["outcome"] for a in response.json()["attempts"]] == ["tls_error"] * 3
    assert simulator.stats()["calls"] == 0  # no request got past the handshake

    def logged() -> list[dict[str, Any]]:
        lines = untrusting_server.request_lines()
        return [line for line in lines if line.get("request_id") == "tls-nobundle"]

    assert wait_until(logged, 5)
    details = [a["detail"] for a in logged()[0]["attempts"]]  # type: ignore[index]
    assert all("CERTIFICATE_VERIFY_FAILED" in d for d in details), details
    metrics = requests.get(untrusting_server.url + "/metrics", timeout=10).text
    assert 'smart_upstream_attempts_total{attempt="1",outcome="tls_error"} 1.0' in metrics


#: New connections in the resumption tests: each attempt asks the upstream to close.
RESUME_ATTEMPTS = 10


@pytest.mark.parametrize("reuse", [True, False])
def test_new_tls_connections_resume_the_last_session_unless_turned_off(
    simulator: SimulatorProcess, reuse: bool
) -> None:
    client = UpstreamClient(
        Settings(
            upstream_url=simulator.work_url,
            upstream_ca_bundle=simulator.ca_path,
            upstream_tls_session_reuse=reuse,
        )
    )
    try:
        before = simulator.stats()
        for _ in range(RESUME_ATTEMPTS):
            outcome = client.fetch_once(1, 0.0, "tls-resume", 5.0, {"Connection": "close"})
            assert outcome.ok, outcome
        after = simulator.stats()
    finally:
        client.close()
    # The control API's own connection (one per stats call) is a full handshake.
    handshakes = after["tls_handshakes"] - before["tls_handshakes"] - 1
    resumed = after["tls_resumed"] - before["tls_resumed"]
    assert handshakes == RESUME_ATTEMPTS
    assert resumed == (RESUME_ATTEMPTS - 1 if reuse else 0)


#: Attempts one after another on one keep-alive connection.
KEEP_ALIVE_ATTEMPTS = 10


def test_an_idle_tls_connection_is_reused_and_the_idle_sweep_keeps_it(
    simulator: SimulatorProcess,
) -> None:
    # TLS 1.3 sends session tickets after the handshake: bytes on an idle connection
    # must not be taken for the upstream's close by the liveness check or the sweep.
    client = UpstreamClient(
        Settings(upstream_url=simulator.work_url, upstream_ca_bundle=simulator.ca_path)
    )
    try:
        before = simulator.stats()["tls_handshakes"]
        for _ in range(KEEP_ALIVE_ATTEMPTS):
            assert client.fetch_once(1, 0.0, "tls-keep-alive", 5.0).ok
            assert client.close_dropped_idle() == 0
        after = simulator.stats()["tls_handshakes"]
    finally:
        client.close()
    assert after - before - 1 == 1  # one connection; the other is the stats call's
