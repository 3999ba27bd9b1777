"""Hostile upstreams for the fault suite: raw HTTP/1.1 over sockets on 127.0.0.1 only.

Each one is a gevent ``StreamServer`` in the test process whose answers a test scripts
byte by byte (interim responses, broken JSON, connections closed behind the client's
back), which the simulator deliberately cannot do. Every socket has TCP_NODELAY:
Nagle plus delayed ACKs would add ~40 ms stalls to every small write.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from gevent.server import StreamServer

#: Largest request head a hostile upstream reads; smart's are a few hundred bytes.
MAX_HEAD_BYTES = 16_384


@dataclass
class Request:
    """One request as the upstream received it, and the connection it came on."""

    sock: socket.socket
    connection: int  # 1-based, in the order connections were accepted
    number: int  # 1-based, among the requests on this connection
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


#: ``answer(request)``: write the answer's bytes; return False to close the connection.
Answer = Callable[[Request], bool]


def response(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    """A complete HTTP/1.1 response with a Content-Length."""
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class HostileUpstream:
    """An upstream on 127.0.0.1 that answers every request with ``answer``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self._server = StreamServer(("127.0.0.1", 0), self._serve)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    @property
    def work_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/work"

    def __enter__(self) -> HostileUpstream:
        self._server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.stop(timeout=1)

    def _serve(self, sock: socket.socket, _address: object) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        connection = self.connections
        buffered = b""
        number = 0
        try:
            while True:
                while b"\r\n\r\n" not in buffered:
                    chunk = sock.recv(4096)
                    if not chunk or len(buffered) > MAX_HEAD_BYTES:
                        return
                    buffered += chunk
                head, buffered = buffered.split(b"\r\n\r\n", 1)
                number += 1
                self.requests += 1
                request = Request(sock, connection, number, _headers(head))
                if not self.answer(request):
                    return
        except OSError:
            return  # the client hung up (a cancelled attempt): nothing to answer
        finally:
            sock.close()


def _headers(head: bytes) -> dict[str, str]:
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers
