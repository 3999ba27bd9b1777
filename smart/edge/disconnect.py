"""Noticing that a client left while its request is being served.

WSGI never says so; gunicorn's gevent worker passes the client socket in the environ
(``gunicorn.socket``), and while the app runs nothing else reads it. A watcher on its
readability costs nothing until the socket turns readable; then ``MSG_PEEK`` tells
end of file or a reset (the client left: nginx's 499) from the bytes of a pipelined
next request (it did not), without taking them from the server.
"""

from __future__ import annotations

import socket
from typing import Any

import gevent
from gevent.event import Event

#: ``recv`` flags: look without consuming, never block the event loop.
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def raw_socket(client: Any) -> Any:
    """The standard socket under ``client``: gevent's socket (and any wrapper of it, as
    the worker's bounded writes) would wait for data in ``recv``, which a callback of
    the event loop must never do."""
    inner = getattr(client, "_sock", None)
    while inner is not None:
        client, inner = inner, getattr(inner, "_sock", None)
    return client


class ClientWatch:
    """``gone`` is set once the client has closed or reset its connection.

    Use as a context manager around the work: the watcher is stopped on exit, before
    the server reads the connection again. Without a socket (a test client, another
    server) it watches nothing and ``gone`` is never set.
    """

    __slots__ = ("_sock", "_watcher", "gone")

    def __init__(self, client: Any) -> None:
        self.gone = Event()
        self._sock: socket.socket | None = None
        self._watcher: Any = None
        fileno = getattr(client, "fileno", None)
        if fileno is None:
            return
        try:
            fd = fileno()
        except OSError:
            return
        if fd < 0:
            return
        self._sock = raw_socket(client)
        self._watcher = gevent.get_hub().loop.io(fd, 1)

    def __enter__(self) -> ClientWatch:
        if self._watcher is not None:
            self._watcher.start(self._readable)
        return self

    def __exit__(self, *exc: object) -> None:
        watcher = self._watcher
        if watcher is not None:
            self._watcher = None
            watcher.stop()
            watcher.close()

    def _readable(self) -> None:
        """Runs in the event loop when the socket turns readable: never blocks."""
        sock = self._sock
        assert sock is not None
        try:
            data = sock.recv(1, _PEEK)
        except BlockingIOError:
            return  # a spurious wake-up
        except OSError:
            data = b""  # reset, or any other error: the connection is no more
        if data:
            # A pipelined request: the client is there. Stop watching, or the bytes
            # waiting in the buffer would wake this up on every turn of the loop.
            self.__exit__()
            return
        self.__exit__()
        self.gone.set()
