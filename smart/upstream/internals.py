"""Every private or undocumented urllib3, requests and http.client name smart relies on,
in one place.

``transport.py`` and ``upstream.py`` reach below the public API for speed, for the
hedge clock, to skip interim answers and to retry on a new connection; the names they
use are checked here. ``ASSUMPTIONS`` says what each relies on
and why, and ``check`` tests it against the installed libraries: the worker runs it at
start (a changed library stops the worker with the assumption's name instead of
misbehaving quietly), and ``tests/unit/test_internals.py`` runs it as one named test each.
Imports urllib3, requests and http.client only.
"""

from __future__ import annotations

import http.client
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.poolmanager
import urllib3.util.timeout

#: The urllib3 releases these assumptions were checked against. The pin in
#: requirements.txt sits inside; CI also runs the checks on the newest release.
SUPPORTED_URLLIB3 = ((2, 8), (3, 0))  # >= 2.8, < 3.0

#: urllib3's "no timeout given" sentinel: a socket must then keep the default
#: timeout, and only this object says so (``util.timeout._DEFAULT_TIMEOUT``).
DEFAULT_TIMEOUT: Any = getattr(urllib3.util.timeout, "_DEFAULT_TIMEOUT", None)


class InternalsChanged(RuntimeError):
    """An installed urllib3 or requests no longer has what smart relies on."""


def dns_host(connection: Any) -> str:
    """The host a urllib3 connection resolves and connects to (its ``_dns_host``)."""
    return str(connection._dns_host)


def idle_queue(pool: Any) -> list[Any]:
    """The connections waiting in a urllib3 pool (``pool.pool.queue``); [] once closed."""
    queue = getattr(pool, "pool", None)
    return [] if queue is None else list(queue.queue)


@dataclass(frozen=True, slots=True)
class Assumption:
    name: str
    why: str  # what in smart breaks if it stops holding
    holds: Callable[[], bool]


def _source(function: Any) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def _pool_queue_holds_connections() -> bool:
    pool = urllib3.connectionpool.HTTPConnectionPool("127.0.0.1", 9, maxsize=1)
    try:
        return hasattr(pool.pool, "queue") and idle_queue(pool) == [None]
    finally:
        pool.close()


def _version() -> tuple[int, int]:
    major, minor = _URLLIB3_VERSION.split(".")[:2]
    return int(major), int(minor)


_URLLIB3_VERSION = version("urllib3")
_HTTPConnection = urllib3.connection.HTTPConnection

ASSUMPTIONS = (
    Assumption(
        "urllib3 version is supported",
        "the assumptions below were checked against urllib3 >=2.8,<3",
        lambda: SUPPORTED_URLLIB3[0] <= _version() < SUPPORTED_URLLIB3[1],
    ),
    Assumption(
        "urllib3.util.timeout._DEFAULT_TIMEOUT",
        "transport._connect must leave a socket's timeout alone when none was given",
        lambda: (
            DEFAULT_TIMEOUT is not None
            and urllib3.util.timeout.Timeout.DEFAULT_TIMEOUT is DEFAULT_TIMEOUT
        ),
    ),
    Assumption(
        "HTTPConnection._dns_host",
        "the watched connect resolves the same host urllib3 would",
        lambda: dns_host(_HTTPConnection("localhost.", 9)) == "localhost.",
    ),
    Assumption(
        "HTTPConnection.connect calls self._new_conn()",
        "the hedge clock watches connects by overriding _new_conn",
        lambda: (
            "self._new_conn()" in _source(_HTTPConnection.connect)
            and "self._new_conn()" in _source(urllib3.connection.HTTPSConnection.connect)
        ),
    ),
    Assumption(
        "HTTPConnection.is_connected",
        "transport's cheap liveness check replaces this property",
        lambda: isinstance(getattr(_HTTPConnection, "is_connected", None), property),
    ),
    Assumption(
        "HTTPConnectionPool.ConnectionCls",
        "transport's pools build its watched connection classes",
        lambda: urllib3.connectionpool.HTTPConnectionPool.ConnectionCls is _HTTPConnection,
    ),
    Assumption(
        "HTTPConnectionPool.pool.queue",
        "the idle sweep and leak checks read the pool's idle connections",
        _pool_queue_holds_connections,
    ),
    Assumption(
        "HTTPConnectionPool.urlopen calls self._get_conn()",
        "an attempt sent again takes a new connection by overriding _get_conn",
        lambda: "self._get_conn(" in _source(urllib3.connectionpool.HTTPConnectionPool.urlopen),
    ),
    Assumption(
        "http.client: getresponse builds self.response_class, begin calls _read_status",
        "transport skips interim (1xx) answers in its response class's _read_status",
        lambda: (
            "self.response_class(" in _source(http.client.HTTPConnection.getresponse)
            and "self._read_status()" in _source(http.client.HTTPResponse.begin)
        ),
    ),
    Assumption(
        "PoolManager.pool_classes_by_scheme",
        "the adapter installs transport's pool classes through it",
        lambda: "pool_classes_by_scheme" in _source(urllib3.poolmanager.PoolManager.__init__),
    ),
    Assumption(
        "HTTPAdapter.get_connection_with_tls_context",
        "the adapter remembers the pool per URL by overriding it",
        lambda: (
            callable(
                getattr(requests.adapters.HTTPAdapter, "get_connection_with_tls_context", None)
            )
            and "get_connection_with_tls_context" in _source(requests.adapters.HTTPAdapter.send)
        ),
    ),
    Assumption(
        "HTTPAdapter passes the pool key and calls cert_verify",
        "the worker's TLS context (tls.py) reaches the pools through the pool key, and "
        "the bundle requests would set on the pool at every send is left out",
        lambda: (
            "build_connection_pool_key_attributes"
            in _source(requests.adapters.HTTPAdapter.get_connection_with_tls_context)
            and "self.cert_verify(" in _source(requests.adapters.HTTPAdapter.send)
        ),
    ),
    Assumption(
        "HTTPSConnection.connect wraps with self.ssl_context",
        "TLS sockets come from the worker's context: the CA bundle loaded once, sessions "
        "resumed, a socket killed mid-handshake closed",
        lambda: (
            "ssl_context=self.ssl_context" in _source(urllib3.connection.HTTPSConnection.connect)
        ),
    ),
    Assumption(
        "HTTPAdapter.send calls request_url and build_response",
        "the adapter caches the request target and builds a bare Response",
        lambda: (
            "self.request_url(" in _source(requests.adapters.HTTPAdapter.send)
            and "self.build_response(" in _source(requests.adapters.HTTPAdapter.send)
        ),
    ),
)


def broken() -> list[Assumption]:
    """The assumptions that do not hold for the installed libraries."""
    failed = []
    for assumption in ASSUMPTIONS:
        try:
            ok = assumption.holds()
        except Exception:  # noqa: BLE001 - a crash in a check is a broken assumption
            ok = False
        if not ok:
            failed.append(assumption)
    return failed


def check() -> None:
    """Raise ``InternalsChanged`` naming every assumption the libraries broke."""
    failed = broken()
    if failed:
        names = "; ".join(f"{a.name} ({a.why})" for a in failed)
        raise InternalsChanged(
            f"urllib3 {_URLLIB3_VERSION} / requests {requests.__version__} changed what "
            f"smart relies on: {names}. See smart/upstream/internals.py."
        )
