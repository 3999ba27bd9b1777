"""The production path is HTTPS: what only TLS has, under gunicorn.

The simulator serves HTTPS with a certificate from a CA made for the run, and smart
trusts that CA through SMART_UPSTREAM_CA_BUNDLE only. The service's core behaviour
(hedge timing, failure kinds, deadlines, cancellation, leaks) runs over HTTPS as well
as HTTP in test_service.py; this module has trust, resumption and connection reuse.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests

from simulator import SimulatorError, SimulatorProcess
from smart.config import Settings
from smart.upstream.client import UpstreamClient
from tests.support import Gunicorn, Servers, wait_until

pytestmark = [pytest.mark.simulator(tls=True), pytest.mark.usefixtures("clean_simulator")]


@pytest.fixture(scope="module")
def server(simulator: SimulatorProcess, module_servers: Servers) -> Gunicorn:
    env = {
        "SMART_UPSTREAM_URL": simulator.work_url,
        "SMART_UPSTREAM_CA_BUNDLE": simulator.ca_path,
    }
    return module_servers.start(env, workers=2)


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


@pytest.fixture(scope="module")
def untrusting_server(simulator: SimulatorProcess, module_servers: Servers) -> Gunicorn:
    env = {"SMART_UPSTREAM_URL": simulator.work_url}  # no bundle: certifi's CAs only
    return module_servers.start(env, workers=1)


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
