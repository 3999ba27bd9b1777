"""gunicorn's gevent worker, with the errors gunicorn answers itself rendered as JSON.

Requests gunicorn rejects before the app sees them (a request line over
``limit_request_line`` → 414, too many or too large headers → 431, a malformed request
→ 400) would otherwise get an HTML page. The master imports this module to resolve
``worker_class``, before gevent patches anything: it must import nothing but gunicorn.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

from gunicorn.workers.ggevent import GeventWorker

#: smart.protection.shedding.CONNECTIONS_CROWDED (this module imports nothing of the app).
CONNECTIONS_CROWDED = "smart.connections_crowded"
#: Share of ``worker_connections`` kept for connections still in the listen queue:
#: past the rest, refused connections are closed after their pause (shedding.py).
CROWDED_HEADROOM = 0.1

_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 431: "headers_too_large"}


class JsonErrorsGeventWorker(GeventWorker):  # type: ignore[misc]
    """``-k gevent`` whose own error responses share the app's JSON error shape, and
    whose accepted-connection limit is the one the app worked out at start."""

    wsgi: Any
    open_connections = 0

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
        self.open_connections += 1
        try:
            super().handle(listener, client, addr)
        finally:
            self.open_connections -= 1

    def handle_error(self, req: Any, client: Any, addr: Any, exc: Exception) -> None:
        # gunicorn decides the status, logs and writes the access line; only the bytes
        # it would send are captured and replaced.
        capture = _Capture(client)
        super().handle_error(req, capture, addr, exc)
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

    def replay_as_json(self) -> None:
        status_line = self.data.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return
        status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
        code = _CODES.get(status, "internal_error" if status >= 500 else "bad_request")
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
