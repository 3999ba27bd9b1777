"""Hostile and careless clients: whatever they send, the answer is a documented one.

Properties over the query string, headers, methods and paths run against the app
through Flask's test client (an upstream that refuses connections makes every valid
request a quick 502). A few cases and slow clients run against real gunicorn, whose
own limits answer some requests before the app sees them.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from urllib.parse import quote, urlencode

import gevent
import psutil
import pytest
import requests
from flask.testing import FlaskClient
from gevent.event import Event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from smart.app import create_app
from smart.config import Settings
from tests.support import Gunicorn, Servers, wait_until

MAX_TIMEOUT_MS = 60_000
REFUSED_UPSTREAM = "http://127.0.0.1:9/api/work"
#: Every answer /api/smart may give, by the contract.
DOCUMENTED = {200, 400, 502, 503, 504}
ERROR_FIELDS = {"error", "message", "request_id", "attempts"}
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
#: Bounded for a shared CI box: each example is one in-process request.
PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def client() -> Iterator[FlaskClient]:
    app = create_app(Settings(upstream_url=REFUSED_UPSTREAM, log_requests=False))
    yield app.test_client()
    app.extensions["smart"].close()


def is_valid_timeout(values: list[str]) -> bool:
    """The contract's rule, stated independently of the code under test."""
    if len(values) != 1:
        return False
    raw = values[0]
    if not (raw.isascii() and raw.isdigit()):
        return False
    significant = raw.lstrip("0")  # leading zeros change nothing: "0250" is 250
    return len(significant) <= len(str(MAX_TIMEOUT_MS)) and 1 <= int(significant or "0") <= (
        MAX_TIMEOUT_MS
    )


def assert_json_error(response: TestResponse, status: int) -> dict[str, object]:
    assert response.status_code == status
    assert response.content_type == "application/json"
    body = response.get_json()
    assert isinstance(body, dict) and set(body) == ERROR_FIELDS
    return body


# --- the query string ---------------------------------------------------------------

timeout_values = st.one_of(
    st.integers(min_value=-10, max_value=MAX_TIMEOUT_MS + 10).map(str),
    st.integers(min_value=1, max_value=MAX_TIMEOUT_MS).map(lambda n: "0" * 20 + str(n)),
    st.text(alphabet="0123456789", min_size=0, max_size=40),
    st.text(alphabet="0123456789+-. _eEx\t", max_size=8),
    st.text(st.characters(categories=["Nd"]), min_size=1, max_size=4),  # any script's digits
    st.text(max_size=30),
    st.just("9" * 5000),
)
keys = st.sampled_from(["timeout", "timeout", "Timeout", "timeout ", "timeout[]", "t", "x"])
queries = st.lists(st.tuples(keys, timeout_values), max_size=4)


@PROPERTY_SETTINGS
@given(pairs=queries)
def test_any_query_string_gets_a_documented_answer_and_never_a_500(
    client: FlaskClient, pairs: list[tuple[str, str]]
) -> None:
    response = client.get("/api/smart?" + urlencode(pairs))
    assert response.status_code in DOCUMENTED
    values = [value for key, value in pairs if key == "timeout"]
    if is_valid_timeout(values) or not values:
        assert response.status_code != 400
        return
    body = assert_json_error(response, 400)
    assert body["error"] == "invalid_timeout"
    assert "'timeout'" in str(body["message"])
    assert len(str(body["message"])) < 300  # a huge value is not echoed back whole


@PROPERTY_SETTINGS
@given(raw=st.text(max_size=200))
def test_any_raw_query_string_bytes_are_handled(client: FlaskClient, raw: str) -> None:
    response = client.get("/api/smart?" + quote(raw, safe="=&;%+"))
    assert response.status_code in DOCUMENTED


# --- headers -------------------------------------------------------------------------

header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=300,
)


@PROPERTY_SETTINGS
@given(request_id=header_text)
def test_a_request_id_is_echoed_only_when_it_is_short_and_inert(
    client: FlaskClient, request_id: str
) -> None:
    response = client.get("/api/smart?timeout=abc", headers={"X-Request-ID": request_id})
    body = assert_json_error(response, 400)
    echoed = response.headers["X-Request-ID"]
    assert body["request_id"] == echoed
    if SAFE_REQUEST_ID.fullmatch(request_id):
        assert echoed == request_id
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", echoed)


@PROPERTY_SETTINGS
@given(
    headers=st.dictionaries(
        st.from_regex(r"X-[A-Za-z0-9-]{1,30}", fullmatch=True), header_text, max_size=60
    )
)
def test_any_extra_headers_change_nothing(client: FlaskClient, headers: dict[str, str]) -> None:
    response = client.get("/api/smart?timeout=0", headers=headers)
    assert_json_error(response, 400)


# --- methods and paths ---------------------------------------------------------------

methods = st.one_of(
    st.sampled_from(["POST", "PUT", "DELETE", "PATCH", "TRACE", "CONNECT", "PROPFIND"]),
    st.from_regex(r"[A-Z][A-Z_-]{0,15}", fullmatch=True),
).filter(lambda m: m not in {"GET", "HEAD", "OPTIONS"})


@PROPERTY_SETTINGS
@given(method=methods)
def test_any_other_method_on_the_endpoint_is_a_json_405_naming_get(
    client: FlaskClient, method: str
) -> None:
    response = client.open("/api/smart?timeout=100", method=method)
    body = assert_json_error(response, 405)
    assert body["error"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


known_paths = {"/api/smart", "/healthz", "/readyz", "/metrics"}


# Segments are quoted whole: a path starting "//" would be read as a host name by the
# test client itself, before any request is made.
paths = st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=5).map(
    lambda segments: "/" + "/".join(quote(segment, safe="") for segment in segments)
)


@PROPERTY_SETTINGS
@given(path=paths)
def test_any_other_path_is_a_json_404(client: FlaskClient, path: str) -> None:
    if path.rstrip("/") in known_paths:
        return
    response = client.get(path)
    body = assert_json_error(response, 404)
    assert body["error"] == "not_found"


def test_a_very_long_url_is_a_json_400_not_an_error(client: FlaskClient) -> None:
    response = client.get("/api/smart?timeout=" + "7" * 100_000 + "&x=" + "y" * 100_000)
    assert_json_error(response, 400)


# --- over real gunicorn --------------------------------------------------------------

#: gunicorn's own limits (gunicorn.conf.py): a longer request line, more headers or a
#: longer header is refused by gunicorn itself before the app is called.
LIMIT_REQUEST_LINE = 4094
#: How fast a normal request must be answered while slow clients hold connections;
#: far below the slow clients' own pace, on a loaded CI box.
PROMPT_S = 1.0
#: Client keep-alive time of the server under test: also gunicorn's limit on receiving
#: a request's headers, which is what ends a slow client.
KEEPALIVE_S = 2
#: Slow clients held open at once; each is a greenlet and a descriptor in the worker.
SLOW_CLIENTS = 200
SLOW_BYTE_EVERY_S = 0.5


@pytest.fixture(scope="module")
def server(module_servers: Servers) -> Gunicorn:
    env = {
        "SMART_UPSTREAM_URL": REFUSED_UPSTREAM,
        "SMART_KEEPALIVE_S": str(KEEPALIVE_S),
        "SMART_LOG_REQUESTS": "false",
    }
    return module_servers.start(env, workers=1)


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_a_long_query_within_gunicorns_limit_reaches_the_app_and_is_a_json_400(
    server: Gunicorn,
) -> None:
    query = "?timeout=" + "9" * (LIMIT_REQUEST_LINE - 40)
    response = requests.get(server.url + "/api/smart" + query, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_timeout"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /api/smart?timeout=" + b"9" * (LIMIT_REQUEST_LINE + 10) + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /api/smart HTTP/1.1\r\n" + b"X-A: 1\r\n" * 150 + b"\r\n", 431),
        (b"GET /api/smart HTTP/1.1\r\nX-Request-ID: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"get /api/smart HTTP/1.1\r\n\r\n", 400),
        (b"GET /api/smart HTTP/9.9\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not HTTP\r\n\r\n", 400),
    ],
    ids=["long-line", "many-headers", "long-header", "lowercase-method", "version", "tls"],
)
def test_requests_gunicorn_refuses_itself_are_json_4xx_and_the_worker_carries_on(
    server: Gunicorn, request_bytes: bytes, status: int
) -> None:
    answer = raw_exchange(server.port, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == status
    assert b"Content-Type: application/json" in head
    assert set(json.loads(body)) == {"error", "message", "request_id", "attempts"}
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def test_an_odd_method_token_over_the_wire_is_a_json_405(server: Gunicorn) -> None:
    answer = raw_exchange(server.port, b"FROB /api/smart HTTP/1.1\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == 405
    assert b"Content-Type: application/json" in head
    assert b'"method_not_allowed"' in body


def slow_client(port: int, stop: Event) -> float:
    """Send a request's headers a byte at a time; how long until the server hung up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    started = time.monotonic()
    try:
        sock.sendall(b"GET /api/smart?timeout=1000 HTTP/1.1\r\nHost: smart\r\n")
        while not stop.is_set():
            sock.sendall(b"X")
            if stop.wait(SLOW_BYTE_EVERY_S):
                break
    except OSError:  # the server closed the connection: what it should do
        pass
    finally:
        sock.close()
    return time.monotonic() - started


def test_slow_clients_neither_block_a_normal_request_nor_hold_their_connections(
    server: Gunicorn,
) -> None:
    stop = Event()
    slow = [gevent.spawn(slow_client, server.port, stop) for _ in range(SLOW_CLIENTS)]
    try:
        (pid,) = server.worker_pids()
        assert wait_until(lambda: len(_established(pid)) >= SLOW_CLIENTS, PROMPT_S * 5)
        started = time.monotonic()
        response = requests.get(server.url + "/api/smart?timeout=500", timeout=10)
        assert response.status_code == 502  # the refused upstream, answered at once
        assert time.monotonic() - started < PROMPT_S
        # gunicorn gives a request's headers the keep-alive time to arrive, then hangs up.
        assert len(gevent.joinall(slow, timeout=KEEPALIVE_S + 5)) == SLOW_CLIENTS
    finally:
        stop.set()
        gevent.joinall(slow, timeout=5)
    assert all(g.value < KEEPALIVE_S + 2 for g in slow)


def _established(pid: int) -> list[object]:
    return [c for c in psutil.Process(pid).net_connections("tcp") if c.status == "ESTABLISHED"]
