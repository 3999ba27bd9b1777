"""The hedge clock over TLS: ``held_by_worker`` polls the raw socket under the TLS layer.

The busy-worker and slow-upstream cases run over TLS in test_hedge_clock.py; this
module has what only TLS has. Two ways that could go wrong. An answer already
decrypted and buffered inside the SSL object leaves the raw socket unreadable: were
an attempt blocked with such an answer, the poll would say "the upstream's time" and
the hedges would fire for nothing. And bytes of TLS that are not the answer could
make the socket look readable and hold the hedges off. Neither happens: gevent's SSL
socket waits on the raw socket only after OpenSSL said it wants more (nothing
decrypted is pending then), and every readable state ends as soon as the worker runs
the attempt.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import gevent
import trustme

from smart.config import Settings
from smart.upstream import exchange
from smart.upstream.client import UpstreamClient
from smart.upstream.exchange import held_by_worker
from tests.support import wait_until

PROMPTLY_S = 5.0
#: http.client reads the socket through an 8 KiB buffered reader: an answer head and
#: body sent as one TLS record of 12 KiB cannot be taken out of OpenSSL in one read.
FIRST_RECORD_BYTES = 12 * 1024
BODY_BYTES = 14 * 1024  # under SMART_MAX_BODY_BYTES; the rest comes in a second record


def test_a_tls_answer_read_in_part_waits_on_the_upstream_with_nothing_decrypted_left(
    tmp_path: Path,
) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_path))
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/api/work"
    client = UpstreamClient(Settings(upstream_url=url, upstream_ca_bundle=str(ca_path)))
    body = b'{"time": 7, "pad": "' + b"x" * (BODY_BYTES - 22) + b'"}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    try:
        attempt = gevent.spawn(client.fetch_once, 1, time.monotonic(), "rid-tls-part", 5.0)
        raw, _ = listener.accept()
        # Else Nagle holds the second record back until the first is acknowledged.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with server_context.wrap_socket(raw, server_side=True) as tls:
            tls.recv(4096)  # the request
            tls.sendall(answer[:FIRST_RECORD_BYTES])  # one record: head and most of the body

            # The attempt takes what arrived (part of it through OpenSSL's own buffer)
            # and blocks for the rest: the upstream's time, with nothing decrypted left.
            assert wait_until(lambda: not held_by_worker(attempt), PROMPTLY_S)
            assert not attempt.ready()
            blocked_on = exchange._watched[attempt].blocked_on
            assert blocked_on is not None
            assert blocked_on[0].pending() == 0

            tls.sendall(answer[FIRST_RECORD_BYTES:])
            # No yield since the send: the rest waits, readable, for the worker.
            assert held_by_worker(attempt)
            outcome = attempt.get(timeout=PROMPTLY_S)
        assert outcome.ok, outcome
        assert outcome.body == body
    finally:
        client.close()
        listener.close()
