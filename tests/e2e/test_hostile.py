"""Hostile upstreams over real sockets: interim responses, lenient JSON, odd headers,
handshakes that never finish, connections closed behind smart's back.

Each upstream is a raw-socket server of ``tests/e2e/hostile.py`` in this process; smart
runs under real gunicorn. Answers echo the attempt's ``X-Request-ID`` in their body,
so a test can tell an answer that belongs to another request.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import gevent
import psutil
import pytest
import requests

from tests.e2e.hostile import HostileUpstream, Request, response
from tests.support import Gunicorn, scrape_total, wait_until

#: How long the hostile upstream waits between a 1xx and its final answer: long
#: enough that the final answer is not in the same segment as the interim one.
INTERIM_GAP_S = 0.03
#: Sequential requests per case: with the 1xx bug, most of 20 got another's answer.
SEQUENTIAL = 20


def echo(request: Request) -> bytes:
    """A valid payload carrying the request it answers."""
    return json.dumps({"time": 1, "request_id": request.request_id}).encode()


def smart_for(upstream: HostileUpstream, tmp_path: Path, **env: str) -> Gunicorn:
    return Gunicorn(
        {"SMART_UPSTREAM_URL": upstream.work_url, "SMART_DEBUG_ENDPOINTS": "true", **env},
        workers=1,
        tmp_path=tmp_path,
    )


def get(server: Gunicorn, request_id: str, query: str = "?timeout=2000") -> requests.Response:
    return requests.get(
        f"{server.url}/api/smart{query}",
        headers={"X-Request-ID": request_id, "Connection": "close"},
        timeout=10,
    )


def outcomes(answer: requests.Response) -> list[str]:
    return [a["outcome"] for a in answer.json()["attempts"]]


# --- 1xx interim responses ----------------------------------------------------------


def interim_then_final(interim: bytes, gap_s: float) -> Any:
    def answer(request: Request) -> bool:
        request.send(interim)
        if gap_s:
            gevent.sleep(gap_s)  # the upstream's own pace, not an ordering of the test
        request.send(response(echo(request)))
        return True

    return answer


@pytest.mark.parametrize("gap_s", [0.0, INTERIM_GAP_S], ids=["together", "apart"])
@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
    ],
    ids=["103", "102", "100-then-103"],
)
def test_interim_responses_are_skipped_and_every_answer_is_its_own_requests(
    tmp_path: Path, interim: bytes, gap_s: float
) -> None:
    # RFC 9110 section 15.2: a client must skip 1xx responses it did not ask for. Taken
    # as final, the 200 behind it stays in the socket for the next request to read.
    with (
        HostileUpstream(interim_then_final(interim, gap_s)) as upstream,
        smart_for(upstream, tmp_path) as server,
    ):
        for n in range(SEQUENTIAL):
            answer = get(server, f"interim-{n}")
            assert answer.status_code == 200, answer.text
            assert answer.json()["request_id"] == f"interim-{n}"
            assert answer.headers["X-Smart-Attempts"] == "1"


# --- payloads strict parsers reject ----------------------------------------------------

#: 200s that ``json.loads`` accepts and RFC 8259 (and JavaScript's JSON.parse) do not.
LENIENT = {
    "nan": b'{"time": NaN}',
    "infinity": b'{"time": 5, "load": Infinity}',
    "minus-infinity": b'{"time": 5, "load": -Infinity}',
    "duplicate-time": b'{"time": 5, "time": -1}',
    "duplicate-nested": b'{"time": 5, "meta": {"a": 1, "a": 2}}',
    "lone-high-surrogate": b'{"time": 5, "note": "\\ud800"}',
    "lone-low-surrogate-key": b'{"time": 5, "\\udc00": 1}',
}
#: Escapes that are valid JSON: a surrogate pair, an escaped backslash before "ud800".
STRICT_BUT_VALID = {
    "surrogate-pair": b'{"time": 5, "note": "\\ud83d\\ude00"}',
    "escaped-backslash": b'{"time": 5, "note": "\\\\ud800"}',
}


def by_request_id(bodies: dict[str, bytes]) -> Any:
    def answer(request: Request) -> bool:
        request.send(response(bodies[request.request_id]))
        return True

    return answer


def test_payloads_that_strict_json_parsers_reject_are_invalid_attempts(tmp_path: Path) -> None:
    with (
        HostileUpstream(by_request_id({**LENIENT, **STRICT_BUT_VALID})) as upstream,
        smart_for(upstream, tmp_path) as server,
    ):
        for name in LENIENT:
            answer = get(server, name)
            assert answer.status_code == 502, (name, answer.text)
            assert outcomes(answer) == ["invalid_payload"] * 3, name
        for name, body in STRICT_BUT_VALID.items():
            answer = get(server, name)
            assert answer.status_code == 200, (name, answer.text)
            assert answer.content == body


# --- framing the upstream gets wrong ----------------------------------------------------

#: Content-Length values that declare no length: a superscript two (a digit to
#: ``str.isdigit``, not to ``int``), a negative, hex, and an underscore that ``int``
#: accepts. Sent as Latin-1, the bytes http.client decodes header values from.
BAD_LENGTHS = {"superscript": "\u00b2", "negative": "-13", "hex": "0xd", "underscore": "1_3"}


def test_an_invalid_content_length_is_a_broken_upstream_answer_not_a_bug_of_ours(
    tmp_path: Path,
) -> None:
    def answer(request: Request) -> bool:
        length = BAD_LENGTHS[request.request_id].encode("latin-1")  # as http.client reads it
        request.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + length + b'\r\n\r\n{"time": 1234}'
        )
        return True  # and keep the connection open, as a keep-alive server does

    with HostileUpstream(answer) as upstream, smart_for(upstream, tmp_path) as server:
        for name in BAD_LENGTHS:
            answer_ = get(server, name)
            assert answer_.status_code == 502, (name, answer_.text)
            assert outcomes(answer_) == ["reset"] * 3, name


#: Answers that are not HTTP/1.1 a client can use, each a broken upstream answer
#: (``reset``), never ``error``, which is kept for smart's own bugs.
NOT_HTTP = {
    "unasked-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    "endless-interim": b"HTTP/1.1 103 Early Hints\r\n\r\n" * 12 + response(b'{"time": 1}'),
    "status-1000": b"HTTP/1.1 1000 Big\r\nContent-Length: 11\r\n\r\n" + b'{"time": 1}',
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 11, 12\r\n\r\n" + b'{"time": 1}',
    "too-many-headers": b"HTTP/1.1 200 OK\r\n"
    + b"X-A: 1\r\n" * 150
    + b"Content-Length: 11\r\n\r\n"
    + b'{"time": 1}',
    "bad-gzip": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 11\r\n\r\n"
    + b'{"time": 1}',
    # The header section cut off by the upstream's close: no blank line, no body.
    "head-cut-off": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
}
#: The answers after which the upstream closes the connection (the others keep it).
CLOSED_AFTER = {"head-cut-off"}


def test_answers_that_are_not_usable_http_are_resets_never_errors(tmp_path: Path) -> None:
    def answer(request: Request) -> bool:
        request.send(NOT_HTTP[request.request_id])
        return request.request_id not in CLOSED_AFTER

    with HostileUpstream(answer) as upstream, smart_for(upstream, tmp_path) as server:
        for name in NOT_HTTP:
            answer_ = get(server, name)
            assert answer_.status_code == 502, (name, answer_.text)
            assert outcomes(answer_) == ["reset"] * 3, name


# --- clients speaking HTTP smart does not ---------------------------------------------


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a connection of its own; everything until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_transfer_coding_smart_cannot_decode_is_a_json_501_not_implemented(
    tmp_path: Path,
) -> None:
    with (
        HostileUpstream(lambda request: False) as upstream,
        smart_for(upstream, tmp_path) as server,
    ):
        answer = raw_exchange(
            server.port,
            b"GET /api/smart HTTP/1.1\r\nHost: smart\r\n"
            b"Transfer-Encoding: br, chunked\r\n\r\n0\r\n\r\n",
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 501 Not Implemented\r\n")
        assert b"Content-Type: application/json" in head
        error = json.loads(body)
        assert error["error"] == "not_implemented"
        assert error["message"] == "Transfer-Encoding 'br, chunked' is not supported"
        assert upstream.requests == 0


# --- which limit ended an attempt -------------------------------------------------------

#: The server under test's connect limit: short, so a handshake that never finishes
#: ends quickly, and far from the request's timeout so the two cannot be confused.
CONNECT_LIMIT_MS = 300


def test_a_tls_handshake_that_never_finishes_is_cut_at_the_connect_limit_and_says_so(
    tmp_path: Path,
) -> None:
    # The upstream accepts the connection and reads the ClientHello, but never answers.
    # The old answer was a 504 saying each attempt was limited to the request's 5000 ms.
    with HostileUpstream(lambda request: False) as upstream:
        env = {
            "SMART_UPSTREAM_URL": f"https://127.0.0.1:{upstream.port}/api/work",
            "SMART_CONNECT_TIMEOUT_MS": str(CONNECT_LIMIT_MS),
        }
        with Gunicorn(env, workers=1, tmp_path=tmp_path) as server:
            answer = get(server, "handshake", "?timeout=5000")
    assert answer.status_code == 502, answer.text
    error = answer.json()
    assert outcomes(answer) == ["tls_error"] * 3
    assert error["message"] == (
        f"all 3 upstream attempts failed to connect within SMART_CONNECT_TIMEOUT_MS "
        f"({CONNECT_LIMIT_MS} ms each; TLS handshake included)"
    )


#: The server under test's attempt limit, for an upstream that never answers.
ATTEMPT_LIMIT_MS = 400
#: How long the silent upstream holds a request: far beyond any limit under test.
SILENT_S = 60.0


def never_answers(request: Request) -> bool:
    gevent.sleep(SILENT_S)
    return False


def test_an_upstream_that_never_answers_is_cut_at_the_attempt_limit_and_says_so(
    tmp_path: Path,
) -> None:
    with HostileUpstream(never_answers) as upstream:
        env = {"SMART_ATTEMPT_TIMEOUT_MS": str(ATTEMPT_LIMIT_MS)}
        with smart_for(upstream, tmp_path, **env) as server:
            answer = get(server, "silent", query="")
    assert answer.status_code == 504, answer.text
    assert outcomes(answer) == ["timeout"] * 3
    assert answer.json()["message"] == (
        f"all 3 upstream attempts timed out (SMART_ATTEMPT_TIMEOUT_MS: {ATTEMPT_LIMIT_MS} ms each)"
    )


# --- kept-alive connections the upstream closes ---------------------------------------

#: How long after its answer the dying upstream closes each connection. The issue saw
#: ~20 ms; longer here, so that the next request reaches the connection before the
#: close even on a loaded box, and meets it: the upstream never reads it.
CLOSE_AFTER_S = 0.1


def answers_once_then_closes(request: Request) -> bool:
    request.send(response(echo(request)))
    gevent.sleep(CLOSE_AFTER_S)  # the upstream's idle timeout, not a test's ordering
    return False


def test_a_kept_alive_connection_the_upstream_closes_costs_a_reconnect_not_a_hedge(
    tmp_path: Path,
) -> None:
    with (
        HostileUpstream(answers_once_then_closes) as upstream,
        smart_for(upstream, tmp_path) as server,
    ):
        for n in range(SEQUENTIAL):
            answer = get(server, f"dying-{n}")
            assert answer.status_code == 200, answer.text
            assert answer.json()["request_id"] == f"dying-{n}"
            assert answer.headers["X-Smart-Attempts"] == "1", answer.headers
        reconnects = scrape_total(server, "smart_upstream_reconnects_total")
        logged = [
            a for line in server.request_lines() for a in line["attempts"] if a["reconnected"]
        ]
    # Requests after the first took the connection their predecessor had used, which
    # the upstream closed without reading them: it answered every request it read.
    assert reconnects >= 1
    assert len(logged) == reconnects
    assert upstream.requests == upstream.connections == SEQUENTIAL


# --- clients that never read their answers ----------------------------------------------

#: The server under test's write limit: short, to keep the test quick.
WRITE_TIMEOUT_MS = 1000
#: A valid payload near SMART_MAX_BODY_BYTES, so that few answers fill the buffers.
BIG_BODY = b'{"time": 1, "pad": "' + b"x" * 15_000 + b'"}'
#: Requests the never-reading client pipelines: 2000 answers of 15 KB are ~30 MB, far
#: more than the kernel buffers of both ends hold.
PIPELINED = 2000
#: The client's receive buffer: small (the kernel's minimum is about this), so that
#: the server's writes stall after a few answers rather than a few hundred.
CLIENT_RCVBUF = 4096
#: How long the answers may take to fill the buffers before the write limit starts to
#: count, on a loaded 2-core box: each is an upstream call through the worker.
FILL_S = 5.0


def big_answer(request: Request) -> bool:
    request.send(response(BIG_BODY))
    return True


def served_connection(pid: int, client_port: int) -> bool:
    return any(
        c.raddr and c.raddr.port == client_port and c.status == "ESTABLISHED"
        for c in psutil.Process(pid).net_connections("tcp")
    )


def test_a_client_that_pipelines_and_never_reads_loses_its_connection_at_the_write_limit(
    tmp_path: Path,
) -> None:
    env = {"SMART_CLIENT_WRITE_TIMEOUT_MS": str(WRITE_TIMEOUT_MS)}
    with HostileUpstream(big_answer) as upstream, smart_for(upstream, tmp_path, **env) as server:
        (pid,) = server.worker_pids()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        sock.connect(("127.0.0.1", server.port))
        client_port = sock.getsockname()[1]
        request = b"GET /api/smart?timeout=2000 HTTP/1.1\r\nHost: smart\r\n\r\n"
        sender = gevent.spawn(sock.sendall, request * PIPELINED)
        try:
            assert wait_until(lambda: served_connection(pid, client_port), FILL_S)
            closed = wait_until(
                lambda: not served_connection(pid, client_port),
                FILL_S + WRITE_TIMEOUT_MS / 1000 * 2,
            )
            assert closed, "the worker still holds the connection of a client that never reads"
        finally:
            sender.kill(block=False)
            sock.close()
        assert upstream.requests < PIPELINED  # it stopped serving that client
        logs = server.logs()
    assert "did not read its answers" in logs
    assert "Socket error processing request" not in logs  # no traceback for it
