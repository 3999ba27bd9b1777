"""gunicorn's gevent worker, with the errors gunicorn answers itself rendered as JSON.

Requests gunicorn rejects before the app sees them (a request line over
``limit_request_line`` → 414, too many or too large headers → 431, a transfer coding it
cannot decode → 501, a malformed request → 400) would otherwise get an HTML page. The
master imports this module to resolve ``worker_class``, before gevent patches anything:
it must import nothing but gunicorn.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

from gunicorn.http.errors import UnsupportedTransferCoding
from gunicorn.workers.ggevent import GeventWorker

_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 431: "headers_too_large"}


class JsonErrorsGeventWorker(GeventWorker):  # type: ignore[misc]
    """``-k gevent`` whose own error responses share the app's JSON error shape."""

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
