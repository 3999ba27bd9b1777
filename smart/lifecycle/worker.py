"""gunicorn's gevent worker, with the errors gunicorn answers itself rendered as JSON.

Requests gunicorn rejects before the app sees them (a request line over
``limit_request_line`` → 414, too many or too large headers → 431, a transfer coding it
cannot decode → 501, a malformed request → 400) would otherwise get an HTML page. Its
writes to a client are bounded too: gunicorn's wait forever for a client that stopped
reading. The master imports this module to resolve ``worker_class``, before gevent
patches anything: it must import nothing but gunicorn and ``smart.config`` (which
imports only the standard library).
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import struct
import uuid
from typing import Any

from gunicorn.http.errors import UnsupportedTransferCoding
from gunicorn.workers.ggevent import GeventWorker

from smart.config import Settings

#: smart.protection.shedding.CONNECTIONS_CROWDED (this module imports nothing of the app).
CONNECTIONS_CROWDED = "smart.connections_crowded"
#: Share of ``worker_connections`` kept for connections still in the listen queue:
#: past the rest, refused connections are closed at once (shedding.py).
CROWDED_HEADROOM = 0.1

#: The kernel's send buffer of a client connection (it doubles the value asked for).
#: Left to autotuning it grows to net.ipv4.tcp_wmem's maximum (4 MiB by default), and a
#: client that reads nothing makes smart queue that much before a write even stalls:
#: 128 KiB hold dozens of smart's answers (each a few hundred bytes up to ~17 KiB), and
#: bound what a client that stopped reading costs this host's kernel.
CLIENT_SEND_BUFFER_BYTES = 64 * 1024

#: SO_LINGER on, with a zero timeout: close() resets the connection and drops what the
#: kernel still holds for it, instead of keeping it queued for a client that reads nothing.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)

_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 431: "headers_too_large"}


class JsonErrorsGeventWorker(GeventWorker):  # type: ignore[misc]
    """``-k gevent`` whose own error responses share the app's JSON error shape, and
    whose writes to a client give up after ``SMART_CLIENT_WRITE_TIMEOUT_MS``, and whose
    accepted-connection limit is the one the app worked out at start."""

    write_timeout_s: float
    wsgi: Any
    open_connections = 0

    def init_process(self) -> None:
        # In the worker, as the app reads its settings: an invalid value stops it.
        self.write_timeout_s = Settings.from_env().client_write_timeout_s
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        # gunicorn sizes the accept pool from this attribute in run(), which comes
        # after the app is built (base.Worker.init_process); the app decided it from
        # the worker's descriptors (smart/protection/capacity.py).
        runtime = getattr(self.wsgi, "extensions", {}).get("smart")
        settings = getattr(runtime, "settings", None)
        if settings is not None and settings.worker_connections:
            self.worker_connections = settings.worker_connections
        crowded_at = self.worker_connections - max(
            1, int(self.worker_connections * CROWDED_HEADROOM)
        )
        app = self.wsgi

        def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
            if self.open_connections >= crowded_at:
                environ[CONNECTIONS_CROWDED] = True
            return app(environ, start_response)

        self.wsgi = wsgi

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        with contextlib.suppress(OSError):  # not a TCP socket (a UNIX one): left as it is
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SEND_BUFFER_BYTES)
        self.open_connections += 1
        try:
            super().handle(listener, _BoundedWrites(client, self.write_timeout_s, self.log), addr)
        finally:
            self.open_connections -= 1

    def handle_error(self, req: Any, client: Any, addr: Any, exc: Exception) -> None:
        # gunicorn decides the status, logs and writes the access line; only the bytes
        # it would send are captured and replaced.
        capture = _Capture(client)
        super().handle_error(req, capture, addr, exc)
        if isinstance(exc, UnsupportedTransferCoding):
            # gunicorn sends "501 Bad Request": a 501 is the server's limit, not the
            # client's fault, and not a failure of the server either.
            message = f"Transfer-Encoding {exc.hdr!r} is not supported"
            capture.replay_as_json(501, "Not Implemented", "not_implemented", message)
        else:
            capture.replay_as_json()


class _BoundedWrites:
    """The client's socket, except that a write which cannot finish in time closes it.

    gunicorn writes each response with ``sendall`` on a socket without a timeout, so a
    client that stops reading (its kernel's buffers full) holds its connection, its
    greenlet and megabytes of queued answers for as long as it stays connected. With a
    timeout, gevent's ``sendall`` gives up when the whole write has not gone out in
    that time: for smart's answers (a few KiB at most) that is when the client has
    read nothing for that long. Reading is untouched: gunicorn's keep-alive timeout
    bounds it.
    """

    def __init__(self, sock: Any, timeout_s: float, log: Any) -> None:
        self._sock = sock
        self._timeout_s = timeout_s
        self._log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        sock = self._sock
        sock.settimeout(self._timeout_s)
        try:
            sock.sendall(data, flags)
        except TimeoutError:
            peer = _peer(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            self._log.warning(
                "closing a client connection: the client did not read its answers for %g s",
                self._timeout_s,
                extra={"remote_addr": peer},
            )
            # EPIPE: gunicorn closes the connection and logs no traceback for it.
            raise BrokenPipeError(errno.EPIPE, "client stopped reading") from None
        finally:
            sock.settimeout(None)


def _peer(sock: Any) -> str | None:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return None


class _Capture:
    """Stands in for the client socket while gunicorn writes its HTML error page."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.data = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def sendall(self, data: bytes) -> None:
        self.data += data

    def replay_as_json(
        self,
        status: int | None = None,
        reason: str = "",
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        """Send gunicorn's answer as JSON; ``status`` and the rest override its own."""
        if status is None:
            status_line = self.data.split(b"\r\n", 1)[0].decode("latin-1")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                return
            status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
        if code is None:
            code = _CODES.get(status, "internal_error" if status >= 500 else "bad_request")
        if message is None:
            message = reason.lower() if status < 500 else "the server failed to answer; see its log"
        body = json.dumps(
            {"error": code, "message": message, "request_id": uuid.uuid4().hex, "attempts": []}
        ).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        # A client already gone would have failed gunicorn's own write as well.
        with contextlib.suppress(OSError):
            self.client.sendall(head.encode("latin-1") + body)
