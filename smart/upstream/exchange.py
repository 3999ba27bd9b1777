"""What the transport sees of one upstream attempt, and the hedge clock's question.

``watch_attempt`` gives the attempt running in a greenlet an ``Exchange``; the
transport records on it what the attempt is blocked on and how its connection fared,
and ``held_by_worker`` asks whether the attempt waits for this worker rather than the
upstream. Knows no requests or urllib3.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gevent import getcurrent
from gevent.monkey import get_original

#: The operating system's poll, even after gevent's patching: one non-blocking look,
#: never a switch to another greenlet.
_poll = get_original("select", "poll")


class Exchange:
    """What the transport saw of one watched attempt, for ``held_by_worker`` and for
    the attempt to report which limit ended it."""

    __slots__ = ("blocked_on", "connecting", "fresh", "headers_read", "reconnected", "reused")

    def __init__(self) -> None:
        #: The socket and the poll(2) event that means the upstream has done its part.
        self.blocked_on: tuple[Any, int] | None = None
        #: Inside ``connect``: the TCP connect, then the TLS handshake. A timeout there
        #: is the connect limit's, whatever exception urllib3 makes of it (a handshake
        #: that times out is raised as a *read* timeout).
        self.connecting = False
        #: The request went out on a kept-alive connection that had answered before.
        self.reused = False
        #: The answer's status line and headers arrived.
        self.headers_read = False
        #: Asked by the attempt: the next request must not take a pooled connection.
        self.fresh = False
        #: The attempt asked for that once already.
        self.reconnected = False

    @property
    def stale(self) -> bool:
        """The kept-alive connection failed before any answer: the upstream had closed it.

        A server closes an idle connection whenever it likes (RFC 9112 section 9.6), so
        a request can meet the close on its way. Nothing of it was answered, and a GET
        is safe to send again (RFC 9110 section 9.2.2).
        """
        return self.reused and not self.headers_read

    def reconnect(self) -> None:
        """Send the next request on a new connection."""
        self.fresh = self.reconnected = True
        self.reused = self.headers_read = False


#: The exchange of each watched attempt's greenlet, from ``watch_attempt``.
_watched: dict[Any, Exchange] = {}


@contextmanager
def watch_attempt() -> Iterator[Exchange]:
    """Make the exchange run in this block visible to ``held_by_worker``."""
    current = getcurrent()
    exchange = _watched[current] = Exchange()
    try:
        yield exchange
    finally:
        del _watched[current]


def held_by_worker(greenlet: Any) -> bool:
    """True when the watched attempt in ``greenlet`` waits for this process, not the upstream.

    It is blocked on a socket event the kernel already has: the connection it is
    opening is established (or refused), or the answer it is reading has arrived (or
    the upstream closed). Only this worker has yet to get round to it. False while
    the upstream has not done its part, and for a greenlet that is not watched.
    """
    exchange = _watched.get(greenlet)
    if exchange is None or exchange.blocked_on is None:
        return False
    sock, event = exchange.blocked_on
    if sock.fileno() < 0:
        return False
    poller = _poll()
    poller.register(sock, event)
    return bool(poller.poll(0))


def current_exchange() -> Exchange | None:
    """The exchange of the attempt running in this greenlet; None when not watched."""
    return _watched.get(getcurrent())


def watch_socket(sock: Any, event: int | None) -> None:
    """What the current (watched) greenlet blocks on next; None: nothing we can see."""
    exchange = _watched.get(getcurrent())
    if exchange is not None:
        exchange.blocked_on = None if event is None else (sock, event)
