"""The simulated upstream's HTTP/1.1 server: just enough HTTP, on gevent's StreamServer.

Why hand-written: the simulator shares its cores with the service it stands in for,
so its CPU per call is taken from what is being measured. gevent's WSGI server parsed
every request head through ``email.parser`` and built a WSGI environ of some forty keys
and a response object per call. Measured with ``python -m bench.simulator_cost
--source OLD .`` (OLD: the tree before this module, pywsgi), fixed 100 ms, keep-alive,
the two taking turns, median of 2 runs of 6 s on the 2-core machine: 261 -> 64 us of
CPU per call at 50 connections (4.1x), 206 -> 74 us at 500 (2.8x), where pywsgi also
saturated its core (2,803 against 4,503 calls/s, p50 188 against 107 ms).

Scope: only what the simulator needs, and nothing more. The request line, headers
(names checked, values kept as text), ``Content-Length`` bodies for the control API,
``Expect: 100-continue``, keep-alive and pipelining. No chunked request bodies, no
HTTP/2. The behaviours write their own responses, raw, to break HTTP on purpose.

Anything it cannot frame (a bad request line or header, an oversized head or body, a
chunked body) is answered 400 and the connection closed: past a framing error the
next request cannot be found.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol

from gevent.hub import Waiter, get_hub
from gevent.server import StreamServer

#: Request line and headers together; a client sending more is not a real one.
MAX_HEAD = 64 * 1024
RECV_SIZE = 64 * 1024
BACKLOG = 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: How long what follows a request refused as unframeable is read and dropped.
LINGER_S = 1.0

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rf"({_TOKEN.pattern}) (\S+) HTTP/1\.(\d)")
# A head ends at its first empty line; bare LF line ends are tolerated, as RFC 9112 allows.
_HEAD_END = re.compile(rb"\n\r?\n")


class BadRequest(Exception):
    """The request cannot be framed; the connection cannot be used any more."""


@dataclass(slots=True)
class Request:
    """One parsed request. Header names are lower case; repeated headers are joined."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class Response:
    """A complete response, written in one send (no Nagle stall to wait out)."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class Application(Protocol):
    """What the server serves: requests, plus a word when a connection opens or closes."""

    def handle(self, request: Request, connection: Connection) -> Response | None:
        """The response, or None when the handler wrote (or refused) one itself."""

    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def handshake_done(self, *, resumed: bool) -> None: ...

    def handshake_failed(self) -> None: ...


class Connection:
    """One client connection: its socket and the bytes read past the last request."""

    __slots__ = ("_buffer", "_readable", "max_body", "released", "socket")

    def __init__(self, sock: socket.socket, max_body: int) -> None:
        self.socket = sock
        self.max_body = max_body
        self.released = False
        self._buffer = b""
        self._readable: Any = None  # an io watcher, made at the first wait

    def readable_within(self, seconds: float) -> bool:
        """True as soon as the socket turns readable (data, EOF or an error); False
        after ``seconds``.

        ``gevent.socket.wait_read(fd, timeout)`` ends a wait that runs out (nearly every
        call's delay does) by raising a Timeout into the greenlet, and the io watcher it
        makes each time costs an ``fcntl`` and a failed ``epoll_ctl``. Here one watcher
        per connection and a timer just wake the waiter.
        """
        hub = get_hub()
        if self._readable is None:
            self._readable = hub.loop.io(self.socket.fileno(), 1)
        waiter = Waiter(hub)
        timer = hub.loop.timer(seconds)
        self._readable.start(waiter.switch, True)
        timer.start(waiter.switch, False)
        try:
            woken: bool = waiter.get()
        finally:
            self._readable.stop()
            timer.close()
        return woken

    def refuse(self, message: str) -> None:
        """Answer 400 and stop. The rest of what the client sent is read and dropped
        for a moment: closing with it unread would send a reset, which can destroy the
        400 before the client reads it.
        """
        body = json.dumps({"error": "bad_request", "message": message}).encode()
        deadline = time.monotonic() + LINGER_S
        with contextlib.suppress(OSError):
            self.send(Response(400, "application/json", body), keep_alive=False)
            self.socket.shutdown(socket.SHUT_WR)
            self.socket.settimeout(LINGER_S)
            while time.monotonic() < deadline and self.socket.recv(RECV_SIZE):
                pass

    def close(self) -> None:
        if self._readable is not None:
            self._readable.close()
        self.socket.close()

    def release(self) -> None:
        """Serve no more requests here: a handler took the socket over (or closed it)."""
        self.released = True

    def read_request(self) -> Request | None:
        """The next request; None if the client closed (or reset) the connection first."""
        buffer = self._buffer.lstrip(b"\r\n")  # empty lines before a request are allowed
        while (end := _HEAD_END.search(buffer)) is None:
            if len(buffer) > MAX_HEAD:
                raise BadRequest(f"request head over {MAX_HEAD} bytes")
            if not (data := self._recv()):
                return None
            buffer = (buffer + data).lstrip(b"\r\n")
        request = _parse_head(buffer[: end.start()].decode("latin-1"))
        length = _content_length(request.headers, self.max_body)
        start = end.end()
        if (
            len(buffer) - start < length
            and request.headers.get("expect", "").lower() == "100-continue"
        ):
            self.socket.sendall(CONTINUE)
        while len(buffer) - start < length:
            if not (data := self._recv()):
                return None
            buffer += data
        request.body = buffer[start : start + length]
        self._buffer = buffer[start + length :]
        return request

    def _recv(self) -> bytes:
        try:
            return self.socket.recv(RECV_SIZE)
        except OSError:
            return b""  # reset: as good as closed

    def send(self, response: Response, *, keep_alive: bool) -> None:
        reason = _reason(response.status)
        lines = [f"HTTP/1.1 {response.status} {reason}", f"Date: {formatdate(usegmt=True)}"]
        lines += [f"{name}: {value}" for name, value in response.headers]
        lines.append(f"Content-Type: {response.content_type}")
        lines.append(f"Content-Length: {len(response.body)}")
        if not keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.socket.sendall(head + response.body)


def _parse_head(head: str) -> Request:
    request_line, *lines = head.split("\n")
    request_line = request_line.rstrip("\r")
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise BadRequest(f"bad request line {request_line[:100]!r}")
    method, target, minor = match.groups()
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not (colon and name):
            raise BadRequest(f"bad header line {line.rstrip(chr(13))[:100]!r}")
        name, value = name.lower(), value.strip(" \t\r")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    # Every name a token (no space: obsolete line folding is refused too, as RFC 9112
    # allows), checked at once: a regex per line was a fifth of a call's parsing.
    if headers and _TOKEN.fullmatch("".join(headers)) is None:
        bad = next(name for name in headers if _TOKEN.fullmatch(name) is None)
        raise BadRequest(f"bad header name {bad[:100]!r}")
    # HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked.
    keep_alive = minor != "0"
    if (connection := headers.get("connection")) is not None:
        tokens = {token.strip() for token in connection.lower().split(",")}
        keep_alive = "keep-alive" in tokens if minor == "0" else "close" not in tokens
    path, _, query = target.partition("?")
    return Request(method, path, query, headers, b"", keep_alive)


def _content_length(headers: dict[str, str], limit: int) -> int:
    if "transfer-encoding" in headers:
        raise BadRequest("request bodies must have a Content-Length")
    value = headers.get("content-length")
    if value is None:
        return 0
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(f"bad Content-Length {value[:100]!r}")
    if int(value) > limit:
        raise BadRequest(f"body over {limit} bytes")
    return int(value)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class Server:
    """A StreamServer running one greenlet per connection, requests in order on each."""

    def __init__(
        self,
        host: str,
        port: int,
        application: Application,
        *,
        max_body: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.application = application
        self.max_body = max_body
        self.tls = tls
        self._server = StreamServer((host, port), self._serve, backlog=BACKLOG)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.address[:2]
        return host, port

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        """Close the listener; connections still open end when the process does."""
        self._server.stop()

    def _serve(self, sock: socket.socket, address: Any) -> None:
        # Without it Nagle + delayed ACK stall small writes by ~40 ms. A failure means
        # the client is already gone, which reading its request will find out.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        application = self.application
        if self.tls is not None:
            # In this connection's greenlet, not in StreamServer's: a client that
            # refuses the certificate ends its own handshake here, quietly.
            try:
                sock = self.tls.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError):
                sock.close()
                application.handshake_failed()
                return
            application.handshake_done(resumed=bool(getattr(sock, "session_reused", False)))
        connection = Connection(sock, self.max_body)
        application.connection_opened()
        try:
            self._serve_requests(connection, application.handle)
        finally:
            application.connection_closed()
            # StreamServer closes the socket too; closing here first sends the FIN at once.
            connection.close()

    def _serve_requests(
        self,
        connection: Connection,
        handle: Callable[[Request, Connection], Response | None],
    ) -> None:
        while not connection.released:
            try:
                request = connection.read_request()
            except BadRequest as exc:
                connection.refuse(str(exc))
                return
            if request is None:
                return
            response = handle(request, connection)
            if connection.released:
                return
            if response is not None:
                try:
                    connection.send(response, keep_alive=request.keep_alive)
                except OSError:
                    return
            if not request.keep_alive:
                return
