"""The HTTP adapter under the upstream session: requests' own, minus per-call work
that smart never uses.

CPU spent in the HTTP client is the throughput ceiling of a worker (docs/PERFORMANCE.md
measures each piece). Imports requests and urllib3 only, and their private names only
through ``internals``; what it sees of an attempt goes into its ``exchange.Exchange``.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
from typing import Any

import requests
from gevent.monkey import get_original
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family

from smart.upstream.exchange import current_exchange, watch_socket
from smart.upstream.internals import DEFAULT_TIMEOUT, dns_host
from smart.upstream.tls import remember_session

#: The operating system's poll, even after gevent's patching: see ``is_connected``.
_poll = get_original("select", "poll")


def _addresses(host: str, port: int) -> list[tuple[Any, ...]]:
    """Where to connect: an IP literal as it is, a name from ``getaddrinfo``.

    Under gevent ``getaddrinfo`` runs in a thread pool, even for a literal: about
    150 µs of CPU, and a turn of a busy event loop, per new connection.
    """
    literal = host.strip("[]")
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, literal)
        except OSError:
            continue
        target = (literal, port) if family == socket.AF_INET else (literal, port, 0, 0)
        return [(family, socket.SOCK_STREAM, 0, "", target)]
    return socket.getaddrinfo(literal, port, allowed_gai_family(), socket.SOCK_STREAM)


def _connect(address: tuple[str, int], timeout: Any, source: Any, options: Any) -> socket.socket:
    """urllib3's ``create_connection``, with each socket watched while it connects."""
    error: OSError | None = None
    for family, kind, proto, _, target in _addresses(*address):
        sock = socket.socket(family, kind, proto)
        try:
            for option in options or ():
                sock.setsockopt(*option)
            if timeout is not DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source:
                sock.bind(source)
            watch_socket(sock, select.POLLOUT)  # writable: connected, or refused
            sock.connect(target)
            # Connected. What follows until the answer's headers (a TLS handshake,
            # sending the request) waits on the upstream, or on nothing: unwatched.
            watch_socket(sock, None)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
        except BaseException:
            # Killed while connecting (a cancelled attempt): no connection object owns
            # this socket yet, so close it now rather than when it is collected.
            sock.close()
            raise
    raise error if error is not None else OSError("getaddrinfo returned no address")


#: Interim (1xx) responses skipped before a final one; more is an upstream gone wrong,
#: and ending it early frees the attempt sooner than its time limit would.
MAX_INTERIM_RESPONSES = 8


class InterimResponseError(http.client.HTTPException):
    """The upstream sent a 101 nobody asked for, or interim responses without end."""


class TruncatedHeadError(http.client.HTTPException):
    """The upstream closed the connection inside the answer's header section."""


class _LastLine:
    """A response's ``fp`` while its head is read: ``readline`` remembers its last line."""

    __slots__ = ("fp", "last")

    def __init__(self, fp: Any) -> None:
        self.fp = fp
        self.last = b""

    def readline(self, limit: int = -1) -> bytes:
        self.last = line = self.fp.readline(limit)
        return bytes(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fp, name)  # close(), when http.client gives up on the answer


class _FinalResponse(http.client.HTTPResponse):
    """http.client's response, reading past every interim (1xx) response, not just 100.

    RFC 9110 section 15.2: a client must skip 1xx responses it does not expect.
    http.client skips only 100 Continue and takes a 103 Early Hints or 102 Processing
    as the final answer, of length 0: the connection then goes back to the pool with
    the real answer still on its way, and the next request on it reads that one.
    """

    def begin(self) -> None:
        """http.client's ``begin``, refusing a header section cut off by end of file.

        http.client ends the headers at the blank line or at end of file alike, so an
        upstream that closes halfway through its headers looks like a complete 200 with
        an empty body: an invalid payload, where the truth is a broken answer.
        """
        if self.headers is not None:
            return
        fp = self.fp
        head = self.fp = _LastLine(fp)
        try:
            super().begin()
        finally:
            if self.fp is head:  # None once http.client closed the connection
                self.fp = fp
        if head.last not in (b"\r\n", b"\n"):
            raise TruncatedHeadError("the connection closed inside the answer's headers")

    def _read_status(self) -> tuple[str, int, str]:
        for _ in range(MAX_INTERIM_RESPONSES + 1):
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 100 <= status < 200:
                return version, status, reason
            if status == 101:
                # Switching protocols is only an answer to an Upgrade, which smart never
                # sends: what follows on this connection is not HTTP/1.1.
                raise InterimResponseError("101 Switching Protocols without an Upgrade")
            http.client.parse_headers(self.fp)
        raise InterimResponseError(f"more than {MAX_INTERIM_RESPONSES} interim responses")


class _AttemptWatch:
    """Shows ``held_by_worker`` the socket a watched attempt is connecting or reading."""

    sock: Any
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any
    #: Answers read on the current socket; one that has answered is a kept-alive one.
    answers = 0

    def _new_conn(self) -> socket.socket:
        if current_exchange() is None:
            return super()._new_conn()  # type: ignore[misc, no-any-return]
        # urllib3's own error mapping, around a connect the watch can see.
        try:
            return _connect(
                (dns_host(self), self.port), self.timeout, self.source_address, self.socket_options
            )
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        except TimeoutError as exc:
            raise ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            ) from exc
        except OSError as exc:
            message = f"Failed to establish a new connection: {exc}"
            raise NewConnectionError(self, message) from exc  # type: ignore[arg-type]

    def connect(self) -> None:
        self.answers = 0
        exchange = current_exchange()
        if exchange is None:
            super().connect()  # type: ignore[misc]
            return
        exchange.connecting = True
        super().connect()  # type: ignore[misc]
        exchange.connecting = False

    def request(self, *args: Any, **kwargs: Any) -> None:
        exchange = current_exchange()
        if exchange is not None:
            exchange.reused = self.sock is not None and self.answers > 0
            exchange.headers_read = False
        super().request(*args, **kwargs)  # type: ignore[misc]

    def getresponse(self) -> Any:
        watch_socket(self.sock, select.POLLIN)  # readable: the answer, or EOF, is here
        response = super().getresponse()  # type: ignore[misc]
        self.answers += 1
        exchange = current_exchange()
        if exchange is not None:
            exchange.headers_read = True
        return response


class _LivenessCheck:
    """urllib3 asks ``is_connected`` of every pooled connection before reusing it.

    Its answer is the same as urllib3's (not readable: neither EOF nor stray bytes),
    but from one non-blocking poll(2). Under gevent, urllib3's own check goes through
    gevent's cooperative ``select.poll``, which starts an io watcher and switches to
    the hub even with a zero timeout: about a tenth of an attempt's CPU here.
    """

    sock: Any

    @property
    def is_connected(self) -> bool:
        if self.sock is None:
            return False
        poller = _poll()
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)


class _Connection(_AttemptWatch, _LivenessCheck, HTTPConnection):
    response_class = _FinalResponse


class _TLSConnection(_AttemptWatch, _LivenessCheck, HTTPSConnection):
    response_class = _FinalResponse

    def getresponse(self) -> Any:
        sock = self.sock  # http.client lets go of it when the answer closes the connection
        response = super().getresponse()
        remember_session(self.ssl_context, sock)
        return response


class _FreshOnRequest:
    """Gives a watched attempt that asked for it (``Exchange.reconnect``) a connection
    of its own: a pooled one it takes is closed first, and urllib3 then reconnects it.
    """

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        exchange = current_exchange()
        if exchange is not None and exchange.fresh:
            exchange.fresh = False
            if conn.sock is not None:
                conn.close()
        return conn


class _Pool(_FreshOnRequest, HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(_FreshOnRequest, HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class UpstreamAdapter(HTTPAdapter):
    """``HTTPAdapter`` with a cheap liveness check and a bare ``Response``.

    ``build_response`` skips what requests does for a browser-like client: copying
    headers into a new dict (urllib3's are already case-insensitive), guessing a text
    encoding, and extracting cookies into a jar that smart never sends back.
    """

    #: Pools and request targets remembered per URL: at most this many URLs.
    _CACHED_URLS = 8

    def __init__(self, *args: Any, tls_context: ssl.SSLContext | None = None, **kwargs: Any):
        #: The worker's one TLS context (``smart.upstream.tls``); None: requests' own,
        #: one per connection.
        self.tls_context = tls_context
        super().__init__(*args, **kwargs)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> Any:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        if self.tls_context is not None and host_params["scheme"] == "https":
            pool_kwargs.pop("ca_certs", None)
            pool_kwargs.pop("ca_cert_dir", None)
            pool_kwargs["ssl_context"] = self.tls_context
        return host_params, pool_kwargs

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        """With the worker's context, nothing to set: its CAs are loaded already.

        requests would set the bundle's path on the pool at every send, and urllib3
        load that file into the context again at every new connection.
        """
        if self.tls_context is None or not url.lower().startswith("https"):
            super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
            return
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
        self._pools: dict[tuple[Any, ...], Any] = {}
        self._targets: dict[str, str] = {}

    def get_connection_with_tls_context(
        self, request: requests.PreparedRequest, verify: Any, proxies: Any = None, cert: Any = None
    ) -> Any:
        """requests' own lookup, remembered per URL while the pool stays open.

        Without proxies the answer depends on the URL and TLS settings alone, yet
        requests parses the URL twice and rebuilds the pool key on every call: about
        a twentieth of an attempt's CPU. A pool the manager closed is looked up again.
        """
        if proxies:
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        key = (request.url, verify, cert)
        pool = self._pools.get(key)
        if pool is None or getattr(pool, "pool", None) is None:
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            if len(self._pools) >= self._CACHED_URLS:
                self._pools.clear()
            self._pools[key] = pool
        return pool

    def request_url(self, request: requests.PreparedRequest, proxies: Any) -> str:
        """The request target: without a proxy, the URL's path and query (remembered)."""
        if proxies:
            return str(super().request_url(request, proxies))
        url = request.url or ""
        target = self._targets.get(url)
        if target is None:
            target = request.path_url
            if len(self._targets) >= self._CACHED_URLS:
                self._targets.clear()
            self._targets[url] = target
        return target

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.headers = resp.headers
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url or ""
        response.request = req
        response.connection = self
        return response
