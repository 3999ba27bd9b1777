"""Hostile upstreams over real sockets: interim responses, lenient JSON, odd headers,
handshakes that never finish, connections closed behind smart's back.

Each upstream is a raw-socket server of ``tests/hostile.py`` in this process; smart
runs under real gunicorn. Answers echo the attempt's ``X-Request-ID`` in their body,
so a test can tell an answer that belongs to another request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests

from tests.hostile import HostileUpstream, Request, response
from tests.support import Gunicorn

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
