"""The upstream client, one attempt at a time, against `responses` (no sockets).

What counts as success, and how each kind of failure is classified. Real sockets,
cancellation and connection reuse are the end-to-end tests' job.
"""

from __future__ import annotations

import time

import pytest
import requests
import responses
from urllib3.exceptions import NameResolutionError, NewConnectionError, ProtocolError

from smart.config import Settings
from smart.hedging.outcome import Kind, Outcome
from smart.upstream.client import UpstreamClient
from smart.upstream.failures import classify
from smart.upstream.payload import is_valid_payload

URL = "http://upstream.test/api/work"


@pytest.fixture
def client() -> UpstreamClient:
    return UpstreamClient(Settings(upstream_url=URL, max_body_bytes=1024))


def fetch(client: UpstreamClient, number: int = 1) -> Outcome:
    return client.fetch_once(number, time.monotonic(), "rid-1", limit_s=5.0)


@pytest.mark.parametrize(
    "body",
    [b'{"time": 160}', b'{"time": 0}', b'{"time": 160, "extra": true}', b' {"time":5} '],
)
def test_a_json_object_with_a_non_negative_integer_time_is_valid(body: bytes) -> None:
    assert is_valid_payload(body)


@pytest.mark.parametrize(
    "body",
    [
        b"<html>ok</html>",
        b'{"time": 1',
        b"{}",
        b'{"time": "12"}',
        b'{"time": true}',
        b'{"time": 1.5}',
        b'{"time": -1}',
        b'{"time": null}',
        b"[1]",
        b"160",
        b"",
        '{"time": 1}'.encode("utf-16"),
        b'{"time": 1e400}',
        b"[" * 100_000,
    ],
)
def test_anything_else_is_an_invalid_payload(body: bytes) -> None:
    assert not is_valid_payload(body)


@responses.activate
def test_a_valid_200_is_a_success_carrying_the_body_unchanged(client: UpstreamClient) -> None:
    responses.get(URL, body=b'{"time": 160}', content_type="application/json")
    outcome = fetch(client)
    assert outcome.kind is Kind.SUCCESS
    assert outcome.body == b'{"time": 160}'


@responses.activate
def test_every_attempt_carries_the_request_id_and_its_number(client: UpstreamClient) -> None:
    responses.get(URL, body=b'{"time": 1}')
    fetch(client, number=3)
    sent = responses.calls[0].request.headers
    assert sent["X-Request-ID"] == "rid-1"
    assert sent["X-Smart-Attempt"] == "3"


@pytest.mark.parametrize("status", [500, 503, 429, 404, 301, 201])
@responses.activate
def test_any_status_but_200_is_a_failed_attempt(client: UpstreamClient, status: int) -> None:
    responses.get(URL, status=status, body=b'{"time": 1}')
    outcome = fetch(client)
    assert outcome.kind is Kind.HTTP_STATUS
    assert outcome.label == f"http_{status}"


@responses.activate
def test_a_200_with_an_invalid_payload_is_a_failed_attempt(client: UpstreamClient) -> None:
    responses.get(URL, body=b"<html></html>", content_type="text/html")
    assert fetch(client).kind is Kind.INVALID_PAYLOAD


@responses.activate
def test_a_body_over_the_cap_is_a_failed_attempt(client: UpstreamClient) -> None:
    responses.get(URL, body=b'{"time": 1, "pad": "' + b"x" * 2000 + b'"}')
    assert fetch(client).kind is Kind.BODY_TOO_LARGE


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (requests.exceptions.ConnectTimeout("connect"), Kind.CONNECT_ERROR),
        (requests.exceptions.ReadTimeout("read"), Kind.TIMEOUT),
        (
            requests.exceptions.ConnectionError(ProtocolError("Connection aborted.")),
            Kind.RESET,
        ),
        (requests.exceptions.ChunkedEncodingError("broken"), Kind.RESET),
        (ConnectionResetError(104, "reset"), Kind.RESET),
    ],
)
@responses.activate
def test_transport_failures_are_classified(
    client: UpstreamClient, raised: Exception, kind: Kind
) -> None:
    responses.get(URL, body=raised)
    assert fetch(client).kind is kind


def test_refused_and_unresolvable_connections_are_connect_errors() -> None:
    class Reason:
        def __init__(self, reason: Exception) -> None:
            self.reason = reason

    refused = NewConnectionError(None, "refused")  # type: ignore[arg-type]
    unresolved = NameResolutionError("nowhere.invalid", None, OSError("no"))  # type: ignore[arg-type]
    for reason in (refused, unresolved):
        exc = requests.exceptions.ConnectionError(Reason(reason))
        assert classify(exc) is Kind.CONNECT_ERROR


def test_a_bug_in_our_code_is_an_error_not_a_transport_failure() -> None:
    assert classify(KeyError("x")) is Kind.ERROR


def test_the_session_ignores_proxies_and_netrc_from_the_environment(
    client: UpstreamClient,
) -> None:
    assert client.session.trust_env is False
