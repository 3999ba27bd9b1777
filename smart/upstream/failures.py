"""What an exception raised during an attempt says about the upstream.

``classify`` maps it to an outcome kind, ``describe`` to the one-line detail the log
carries; ``connect_timed_out`` tells which limit ended it. Nothing here is smart's own
bug except what falls through to ``Kind.ERROR``.
"""

from __future__ import annotations

import ssl

import requests
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import NameResolutionError, NewConnectionError
from urllib3.exceptions import ReadTimeoutError as Urllib3ReadTimeout
from urllib3.exceptions import SSLError as Urllib3SSLError

from smart.hedging.outcome import Kind
from smart.upstream.tls import TLSHandshakeTimeout


def classify(exc: Exception) -> Kind:  # noqa: PLR0911 - one return per kind reads best
    """Map what requests/urllib3 raised during an attempt to an outcome kind."""
    # First: requests' SSLError is a ConnectionError, and a certificate the upstream's
    # CA bundle does not vouch for is not a network problem.
    if isinstance(exc, requests.exceptions.SSLError | Urllib3SSLError | ssl.SSLError):
        return Kind.TLS_ERROR
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return Kind.CONNECT_ERROR
    if isinstance(exc, requests.exceptions.ReadTimeout | Urllib3ReadTimeout | TimeoutError):
        return Kind.TIMEOUT
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        if isinstance(reason, NewConnectionError | NameResolutionError):
            return Kind.CONNECT_ERROR
        return Kind.RESET
    if isinstance(exc, requests.exceptions.RequestException | Urllib3HTTPError | OSError):
        return Kind.RESET
    return Kind.ERROR


def connect_timed_out(exc: BaseException) -> bool:
    """The TCP connect or the TLS handshake ran out of SMART_CONNECT_TIMEOUT_MS."""
    seen: BaseException | None = exc
    for _ in range(8):  # requests wraps urllib3, which wraps the socket's error
        if seen is None:
            return False
        if isinstance(seen, requests.exceptions.ConnectTimeout | TLSHandshakeTimeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe(exc: Exception) -> str:
    reason = _ssl_reason(exc)
    if reason is not None:
        # The wrappers' text (pool, URL, "Max retries exceeded") would push OpenSSL's
        # reason, the part the on-call engineer needs, past the cut.
        exc = reason
    return f"{type(exc).__name__}: {exc}"[:300]


def _ssl_reason(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl`` error under requests' and urllib3's wrappers, if there is one."""
    seen: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(seen) < 16:
        item = todo.pop()
        if not isinstance(item, BaseException) or any(item is s for s in seen):
            continue
        if isinstance(item, ssl.SSLError):
            return item
        seen.append(item)
        todo += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
    return None
