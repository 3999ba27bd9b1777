"""TLS failures under gunicorn, from a hostile HTTPS upstream of the test's own.

Each is a failed attempt with its own kind: a certificate smart must refuse or a
broken TLS session is ``tls_error`` (OpenSSL's reason in the log), a handshake the
upstream never finishes is bounded by the request's deadline, and a close in the
middle of the body, TLS's own or TCP's, is a truncation (``reset``), as over plain
HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.e2e.tls_servers import HostileTLSServer
from tests.support import Gunicorn, wait_until

#: How far past its due time an answer may come on a loaded shared 2-core box.
TOLERANCE_S = 0.1
#: The contract: connections of attempts given up on are closed within 1 s.
CANCEL_WITHIN_S = 1.0
#: SMART_CONNECT_TIMEOUT_MS here: it bounds a handshake when the client gave no timeout.
CONNECT_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileTLSServer]:
    with HostileTLSServer(tmp_path_factory.mktemp("hostile")) as server:
        yield server


@pytest.fixture(scope="module")
def server(
    upstream: HostileTLSServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    env = {
        "SMART_UPSTREAM_URL": upstream.work_url,
        "SMART_UPSTREAM_CA_BUNDLE": upstream.ca_path,
        "SMART_CONNECT_TIMEOUT_MS": str(int(CONNECT_TIMEOUT_S * 1000)),
    }
    with Gunicorn(env, workers=1, tmp_path=tmp_path_factory.mktemp("faults")) as gunicorn:
        yield gunicorn


@pytest.fixture(autouse=True)
def fresh(upstream: HostileTLSServer) -> None:
    upstream.mode = "ok"
    upstream.seen.clear()


def get(server: Gunicorn, query: str, request_id: str) -> requests.Response:
    return requests.get(
        f"{server.url}/api/smart{query}", headers={"X-Request-ID": request_id}, timeout=10
    )


def details(server: Gunicorn, request_id: str) -> list[str]:
    def line() -> dict[str, Any] | None:
        found = [x for x in server.request_lines() if x.get("request_id") == request_id]
        return found[0] if found else None

    assert wait_until(lambda: line() is not None, 5), "no request log line"
    logged = line()
    assert logged is not None
    return [str(a["detail"]) for a in logged["attempts"]]  # type: ignore[union-attr]


def test_the_hostile_upstream_answers_when_told_to(server: Gunicorn) -> None:
    response = get(server, "?timeout=2000", "fault-ok")
    assert response.status_code == 200, response.text
    assert response.json() == {"time": 42}


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("untrusted", "CERTIFICATE_VERIFY_FAILED"),
        ("wrong_name", "IP address mismatch"),
        ("expired", "certificate has expired"),
        ("bad_record", "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"),
    ],
)
def test_a_refused_certificate_or_broken_session_is_a_tls_error(
    server: Gunicorn, upstream: HostileTLSServer, mode: str, reason: str
) -> None:
    upstream.mode = mode
    request_id = f"fault-{mode}"
    response = get(server, "?timeout=2000", request_id)
    assert response.status_code == 502, response.text
    assert response.json()["error"] == "upstream_failed"
    assert [a["outcome"] for a in response.json()["attempts"]] == ["tls_error"] * 3
    assert all(reason in d for d in details(server, request_id))
    assert wait_until(upstream.all_closed_by_client, CANCEL_WITHIN_S)


@pytest.mark.parametrize("mode", ["truncate", "close_notify"])
def test_a_close_mid_body_over_tls_is_a_truncation(
    server: Gunicorn, upstream: HostileTLSServer, mode: str
) -> None:
    # TLS's own close (close_notify) ends the session cleanly, but not the HTTP body.
    upstream.mode = mode
    response = get(server, "?timeout=2000", f"fault-{mode}")
    assert response.status_code == 502, response.text
    assert [a["outcome"] for a in response.json()["attempts"]] == ["reset"] * 3
    assert all("IncompleteRead" in d for d in details(server, f"fault-{mode}"))


def test_a_handshake_never_finished_is_bounded_by_the_requests_deadline(
    server: Gunicorn, upstream: HostileTLSServer
) -> None:
    upstream.mode = "no_handshake"
    response = get(server, "?timeout=400", "fault-handshake")
    assert response.status_code == 504, response.text
    assert [a["outcome"] for a in response.json()["attempts"]] == ["cancelled"] * 3
    assert 0.4 <= response.elapsed.total_seconds() + 0.005 <= 0.4 + TOLERANCE_S
    # The hedges started at 300 ms: a handshake in progress is the upstream's time.
    assert len(upstream.seen) == 3
    assert wait_until(upstream.all_closed_by_client, CANCEL_WITHIN_S)


def test_without_a_timeout_a_handshake_never_finished_ends_at_the_connect_limit(
    server: Gunicorn, upstream: HostileTLSServer
) -> None:
    upstream.mode = "no_handshake"
    response = get(server, "", "fault-handshake-bounded")
    assert response.status_code == 502, response.text
    assert [a["outcome"] for a in response.json()["attempts"]] == ["tls_error"] * 3
    # Attempt 1 gives up at the connect limit and the hedges start at once.
    assert response.elapsed.total_seconds() <= 2 * CONNECT_TIMEOUT_S + TOLERANCE_S
    assert all(
        "TLS handshake not finished" in d for d in details(server, "fault-handshake-bounded")
    )
    assert wait_until(upstream.all_closed_by_client, CANCEL_WITHIN_S)
