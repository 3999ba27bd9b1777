"""What the simulated upstream does with one call to ``/api/work``: every behaviour kind.

Behaviours write raw bytes to the client socket so they can break HTTP on purpose.
This module knows nothing of the server or its control API; gevent only for waiting.
"""

from __future__ import annotations

import functools
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

import gevent

JSON = "application/json"
HTML = "text/html; charset=utf-8"
MIB = 1024 * 1024

HANG_LIMIT_S = 120.0
ENDLESS_LIMIT_S = 60.0
# 1 KiB every 10 ms: enough to blow any sane body cap within a second.
ENDLESS_CHUNK = b" " * 1024
ENDLESS_INTERVAL_S = 0.01
# Partial bytes must reach the client before the RST: a reset discards unsent data.
PARTIAL_PAUSE_S = 0.05
# A client that reads nothing for this long is treated as gone.
SEND_LIMIT_S = 30.0

HTML_PAGE = b"<!doctype html><html><body><h1>502 Bad Gateway</h1></body></html>\n"
GARBAGE = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 this is not HTTP\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Step:
    """One scripted (or drawn) behaviour: a kind plus the parameters some kinds take."""

    kind: str
    delay_ms: float = 0.0
    status: int = 500
    size: int = MIB
    interval_ms: float = 50.0

    def delayed(self, delay_ms: float) -> Step:
        """This step after ``delay_ms``: as ``dataclasses.replace`` would, in half the time."""
        return Step(self.kind, delay_ms, self.status, self.size, self.interval_ms)

    @property
    def label(self) -> str:
        """The name stats and failure-kind lists use: ``status_503`` for statuses."""
        return f"status_{self.status}" if self.kind == "status" else self.kind

    @classmethod
    def named(cls, name: str) -> Step:
        """A step from a kind name; ``status_NNN`` is shorthand for kind ``status``."""
        if name.startswith("status_"):
            return cls("status", status=_status_code(name.removeprefix("status_")))
        if name not in BEHAVIOURS or name == "status":
            known = ", ".join(sorted({*BEHAVIOURS, "status_NNN"} - {"status"}))
            raise ValueError(f"unknown kind {name!r}; known: {known}")
        return cls(name)

    @classmethod
    def parse(cls, data: object) -> Step:
        """A step from its JSON form, e.g. ``{"kind": "status", "status": 503}``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a step must be a JSON object, got {data!r}")
        unknown = set(data) - {"kind", "delay_ms", "status", "size", "interval_ms"}
        if unknown:
            raise ValueError(f"unknown step fields: {', '.join(sorted(map(str, unknown)))}")
        kind = data.get("kind")
        if not isinstance(kind, str):
            raise ValueError(f"a step needs a string 'kind', got {data!r}")
        step = cls("status") if kind == "status" else cls.named(kind)
        changes: dict[str, Any] = {
            name: _number(name, data[name]) for name in ("delay_ms", "interval_ms") if name in data
        }
        if "size" in data:
            changes["size"] = int(_number("size", data["size"], integral=True))
        if "status" in data:
            changes["status"] = _status_code(data["status"])
        return replace(step, **changes)


def _number(name: str, value: object, *, integral: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not 0 <= value < float("inf") or (integral and value != int(value)):
        raise ValueError(f"{name} must be a finite {'integer' if integral else 'number'} >= 0")
    return float(value)


def _status_code(value: object) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValueError(f"status must be an integer from 100 to 599, got {value!r}")
    return value


@dataclass(slots=True)
class CallRecord:
    """What the stats report about one call.

    Times are ``time.monotonic()`` seconds: CLOCK_MONOTONIC, one clock for every process
    on the host, so a test can compare them with its own.
    """

    id: int
    request_id: str | None
    attempt: str | None
    traceparent: str | None
    started: float
    kind: str = ""
    ended: float | None = None
    client_closed: bool = False
    client_closed_at: float | None = None


class RawConnection:
    """The client socket under one request, for behaviours that break HTTP.

    ``readable_within(seconds)`` is the server's: True as soon as the socket turns
    readable (data, EOF or an error), False once ``seconds`` have passed.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        keep_alive: bool,
        release: Callable[[], None],
        readable_within: Callable[[float], bool],
    ):
        self.socket = sock
        self.keep_alive = keep_alive
        self._release = release  # makes the server forget the connection
        self.readable_within = readable_within
        self.dropped = False

    def drop(self, *, reset: bool) -> None:
        """Close the connection: a FIN, or with ``reset`` an RST (SO_LINGER 0)."""
        if self.dropped:
            return
        self.dropped = True
        try:
            if reset:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client is already gone
        # The server's reader holds a reference to the socket; the RST is only sent
        # when the last one is closed.
        self._release()
        self.socket.close()


#: The first byte of a TLS alert record: over TLS, a client that closes cleanly sends
#: close_notify before its FIN.
_TLS_ALERT = b"\x15"


def _peek(sock: socket.socket) -> bytes:
    """The next byte the client sent, left unread; b"" at EOF.

    A TLS socket refuses ``MSG_PEEK``; its raw socket under it does not, and shows
    the next record's type byte, which is all a close check needs.
    """
    raw = getattr(sock, "_sock", None) if hasattr(sock, "_sslobj") else None
    return (raw if raw is not None else sock).recv(1, socket.MSG_PEEK)


@dataclass(slots=True)
class Call:
    """One ``/api/work`` call being answered: its connection and its record."""

    conn: RawConnection
    record: CallRecord
    slept_ms: int = 0

    def wait(self, seconds: float) -> bool:
        """Sleep, unless the client leaves first; then the call is abandoned and False.

        A plain sleep would not notice a cancelled request: the socket is watched for
        readability, and a peek that finds EOF (or an error) means the client closed.
        """
        sock = self.conn.socket
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if not self.conn.readable_within(remaining):
                return True
            try:
                peeked = _peek(sock)
            except OSError:
                peeked = b""
            if not peeked or peeked == _TLS_ALERT:
                self.client_left()
                return False
            # A pipelined request: the socket stays readable, so it can no longer be
            # watched for a close. Sleep out the rest.
            gevent.sleep(max(0.0, deadline - time.monotonic()))
        return True

    def send(self, data: bytes) -> bool:
        """Write all of ``data``; False (and the call abandoned) if the client is gone."""
        sock = self.conn.socket
        previous = sock.gettimeout()
        sock.settimeout(SEND_LIMIT_S)
        try:
            # One send takes a whole reply of the usual size; sendall, which asks the
            # kernel for the buffer size each time, only for what is left over.
            sent = sock.send(data)
            if sent < len(data):
                sock.sendall(memoryview(data)[sent:])
        except TimeoutError:
            self.conn.drop(reset=True)
            return False
        except OSError:
            self.client_left()
            return False
        sock.settimeout(previous)
        return True

    def client_left(self) -> None:
        self.record.client_closed = True
        self.record.client_closed_at = time.monotonic()
        self.conn.drop(reset=False)

    def head(self, status: int, content_type: str, length: int | None) -> bytes:
        """Status line and headers; ``length=None`` means a chunked body."""
        framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
        retry = "Retry-After: 1\r\n" if status == 429 else ""
        close = "" if self.conn.keep_alive else "Connection: close\r\n"
        head = f"{_status_line(status)}Content-Type: {content_type}\r\n{framing}\r\n"
        return f"{head}{retry}{close}\r\n".encode("latin-1")

    def respond(self, status: int, content_type: str, body: bytes) -> None:
        """A complete response in one write (one segment: no Nagle stall to wait out)."""
        self.send(self.head(status, content_type, len(body)) + body)

    def payload(self) -> bytes:
        """``{"time": N}`` byte for byte as ``json.dumps`` writes it, at a tenth of the cost."""
        return b'{"time": %d}' % self.slept_ms


@functools.cache
def _status_line(status: int) -> str:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n"


Behaviour = Callable[[Call, Step], None]


def _fixed(status: int, content_type: str, body: bytes) -> Behaviour:
    def behave(call: Call, step: Step) -> None:
        call.respond(status, content_type, body)

    return behave


def _ok(call: Call, step: Step) -> None:
    call.respond(200, JSON, call.payload())


def _status(call: Call, step: Step) -> None:
    body = b'{"error": "simulated", "status": %d}' % step.status  # as json.dumps writes it
    call.respond(step.status, JSON, body)


def _huge(call: Call, step: Step) -> None:
    # Valid and well-typed, only too big: a client must enforce its own size cap.
    frame = b'{"time": %d, "padding": "' % call.slept_ms
    call.respond(200, JSON, frame + b"x" * max(0, step.size - len(frame) - 2) + b'"}')


def _trickle(call: Call, step: Step) -> None:
    body = call.payload()
    if not call.send(call.head(200, JSON, len(body)) + body[:1]):
        return
    for i in range(1, len(body)):
        if not (call.wait(step.interval_ms / 1000) and call.send(body[i : i + 1])):
            return


def _truncated(call: Call, step: Step) -> None:
    body = call.payload()
    if call.send(call.head(200, JSON, len(body)) + body[: len(body) // 2]):
        call.conn.drop(reset=False)


def _endless(call: Call, step: Step) -> None:
    deadline = time.monotonic() + ENDLESS_LIMIT_S
    chunk = b"%x\r\n%s\r\n" % (len(ENDLESS_CHUNK), ENDLESS_CHUNK)
    if not call.send(call.head(200, JSON, None) + b"1\r\n{\r\n"):
        return
    while time.monotonic() < deadline:
        if not (call.wait(ENDLESS_INTERVAL_S) and call.send(chunk)):
            return
    call.conn.drop(reset=True)  # never a complete body, not even after the limit


def _reset_after(partial: Callable[[Call], bytes]) -> Behaviour:
    def behave(call: Call, step: Step) -> None:
        data = partial(call)
        if data and not (call.send(data) and call.wait(PARTIAL_PAUSE_S)):
            return
        call.conn.drop(reset=True)

    return behave


def _half_response(call: Call) -> bytes:
    body = call.payload()
    return call.head(200, JSON, len(body)) + body[: len(body) // 2]


def _garbage(call: Call, step: Step) -> None:
    if call.send(GARBAGE):
        call.conn.drop(reset=False)


def _close(call: Call, step: Step) -> None:
    call.conn.drop(reset=False)


def _hang(call: Call, step: Step) -> None:
    if call.wait(HANG_LIMIT_S):
        call.conn.drop(reset=False)


BEHAVIOURS: dict[str, Behaviour] = {
    "ok": _ok,
    "status": _status,
    "html": _fixed(200, HTML, HTML_PAGE),
    "bad_json": _fixed(200, JSON, b'{"time": 1'),
    "wrong_type": _fixed(200, JSON, b'{"time": "12"}'),
    "empty_object": _fixed(200, JSON, b"{}"),
    "float": _fixed(200, JSON, b'{"time": 1.5}'),
    "bool": _fixed(200, JSON, b'{"time": true}'),
    "negative": _fixed(200, JSON, b'{"time": -1}'),
    "not_object": _fixed(200, JSON, b"[1]"),
    "truncated": _truncated,
    "huge": _huge,
    "endless": _endless,
    "trickle": _trickle,
    "reset": _reset_after(lambda call: b""),
    "reset_mid_headers": _reset_after(lambda call: b"HTTP/1.1 200 OK\r\nContent-Type: appl"),
    "reset_mid_body": _reset_after(_half_response),
    "garbage": _garbage,
    "close": _close,
    "hang": _hang,
}
"""Every behaviour kind, by name. ``delay_ms`` is slept before it runs (except ``hang``)."""
