"""A hostile HTTPS upstream for tests: each connection breaks TLS the way ``mode`` says.

Runs in the test process on gevent, on 127.0.0.1 and a free port. It records how each
connection ended, so a test can see that smart closed the ones it gave up on.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import gevent
import gevent.event
import gevent.socket
import trustme
from gevent.server import StreamServer

#: Modes: a valid answer; a certificate from a CA the client does not trust; a trusted
#: certificate for another host; a trusted one that has expired; a handshake never
#: answered; in the middle of the body, a bogus TLS record, TLS's own close alert
#: (close_notify), or a TCP close with no TLS close before it.
MODES = (
    "ok",
    "untrusted",
    "wrong_name",
    "expired",
    "no_handshake",
    "bad_record",
    "close_notify",
    "truncate",
)
BODY = b'{"time": 42}'
#: Header, then a body that promises more than the first part that is sent.
PARTIAL_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
PARTIAL_BODY = b'{"time": 42, "pad": "'
#: A TLS 1.2-style application-data record whose content is noise: it cannot decrypt.
BOGUS_RECORD = b"\x17\x03\x03\x00\x20" + bytes(range(32))
#: How long ago the "expired" certificate stopped being valid.
EXPIRED_FOR = datetime.timedelta(days=1)
#: How long a connection that waits for the client to leave waits at most.
HOLD_S = 30.0


@dataclass(slots=True)
class Seen:
    """One connection as the server saw it."""

    mode: str
    opened: float
    request: bytes = b""
    closed_by_client: float | None = None


@dataclass
class HostileTLSServer:
    """``with HostileTLSServer(tmp_path) as server:``; trust ``server.ca_path``."""

    directory: Path
    mode: str = "ok"
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.authority = trustme.CA()
        self.ca_path = str(self.directory / "hostile-ca.pem")
        self.authority.cert_pem.write_to_path(self.ca_path)
        self._contexts = {
            "right": self._context(self.authority.issue_cert("127.0.0.1", "localhost")),
            "wrong_name": self._context(self.authority.issue_cert("upstream.example")),
            "untrusted": self._context(trustme.CA().issue_cert("127.0.0.1", "localhost")),
            "expired": self._context(
                self.authority.issue_cert(
                    "127.0.0.1",
                    not_before=datetime.datetime.now(datetime.UTC) - EXPIRED_FOR * 2,
                    not_after=datetime.datetime.now(datetime.UTC) - EXPIRED_FOR,
                )
            ),
        }
        self._stopping = gevent.event.Event()
        self._server = StreamServer(("127.0.0.1", 0), self._serve)

    @staticmethod
    def _context(leaf: trustme.LeafCert) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(context)
        return context

    @property
    def port(self) -> int:
        return int(self._server.address[1])

    @property
    def work_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/api/work"

    def __enter__(self) -> HostileTLSServer:
        self._server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._server.stop(timeout=1)

    def all_closed_by_client(self) -> bool:
        return bool(self.seen) and all(s.closed_by_client is not None for s in self.seen)

    def _serve(self, raw: socket.socket, address: Any) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seen = Seen(self.mode, time.monotonic())
        self.seen.append(seen)
        try:
            if seen.mode == "no_handshake":
                seen.request = raw.recv(4096)  # the ClientHello, never answered
                self._hold(raw, seen)
                return
            context = self._contexts.get(seen.mode, self._contexts["right"])
            try:
                tls = context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                seen.closed_by_client = time.monotonic()  # it refused the certificate
                return
            with tls:
                seen.request = tls.recv(4096)
                self._answer(tls, seen)
        finally:
            raw.close()

    def _answer(self, tls: ssl.SSLSocket, seen: Seen) -> None:
        if seen.mode == "ok":
            # Connection: close, so that every attempt makes (and tests) a new connection.
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            tls.sendall(head + b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
            self._hold(tls, seen)
        elif seen.mode == "bad_record":
            tls.sendall(PARTIAL_HEAD + PARTIAL_BODY)
            # Under the TLS layer: the client's next read meets a record it cannot open.
            _raw(tls).send(BOGUS_RECORD)
            self._hold(tls, seen)
        elif seen.mode == "close_notify":
            tls.sendall(PARTIAL_HEAD + PARTIAL_BODY)
            with contextlib.suppress(OSError):
                tls.unwrap()  # the alert is sent; the client's own may never come
        elif seen.mode == "truncate":
            tls.sendall(PARTIAL_HEAD + PARTIAL_BODY)
            _raw(tls).shutdown(socket.SHUT_RDWR)  # a FIN, with no close_notify before it

    def _hold(self, sock: socket.socket, seen: Seen) -> None:
        """Wait, reading nothing of TLS, until the client closes the connection."""
        raw = _raw(sock)
        deadline = time.monotonic() + HOLD_S
        while not self._stopping.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                gevent.socket.wait_read(raw.fileno(), timeout=0.05)
                try:
                    peeked = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    peeked = b""
                if not peeked or peeked == b"\x15":  # EOF, or a TLS alert (close_notify)
                    seen.closed_by_client = time.monotonic()
                    return
                # Bytes the client sent after its request (a ticket ack): drop them.
                raw.recv(4096, socket.MSG_DONTWAIT)


def _raw(sock: socket.socket) -> Any:
    """The operating system's socket under a (gevent) socket, TLS or not."""
    return getattr(sock, "_sock", sock)
