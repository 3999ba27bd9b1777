"""The upstream client: one HTTP attempt in, one ``Outcome`` out, never an exception.

Owns the worker's ``requests.Session``; what counts as success is ``payload.py``'s,
what a failure means ``failures.py``'s. Knows nothing of hedging or Flask.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Mapping
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import urlsplit

import gevent
import requests
from gevent import monkey
from requests.structures import CaseInsensitiveDict

from smart.config import Settings
from smart.hedging.outcome import Kind, Limit, Outcome
from smart.upstream import internals
from smart.upstream.exchange import Exchange, held_by_worker, watch_attempt
from smart.upstream.failures import classify, connect_timed_out, describe
from smart.upstream.internals import idle_queue
from smart.upstream.payload import content_length, is_valid_payload
from smart.upstream.tls import upstream_tls_context
from smart.upstream.transport import UpstreamAdapter

ATTEMPT_HEADER = "X-Smart-Attempt"
REQUEST_ID_HEADER = "X-Request-ID"
#: The kernel's poll, not gevent's: checking an idle connection must never yield to
#: another greenlet, which could take that connection out of the pool meanwhile.
_POLL = monkey.get_original("select", "poll")
_READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class UpstreamClient:
    """Makes single attempts against the upstream over one shared ``Session``.

    Create one per worker process, after the fork: a session made before it would
    share sockets between workers.
    """

    def __init__(
        self, settings: Settings, on_reconnect: Callable[[int], None] | None = None
    ) -> None:
        internals.check()  # a urllib3 that changed under the transport stops the worker
        self._settings = settings
        #: Told the attempt's number each time an attempt is sent again (``_exchange``).
        self._on_reconnect = on_reconnect
        self.session = requests.Session()
        # Hedging is the retry policy, proxies and .netrc are not ours to pick up from
        # the environment, and upstream cookies must not leak between clients (attempts
        # bypass the cookie jar; the policy guards any other use of the session).
        self.session.trust_env = False
        # Never False: with trust_env off, REQUESTS_CA_BUNDLE is not read either, so a
        # private CA is trusted only through SMART_UPSTREAM_CA_BUNDLE.
        self._verify: str | bool = settings.upstream_ca_bundle or True
        self.session.verify = self._verify
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        # pool_block=False: a killed greenlet waiting for a blocking pool slot corrupts
        # the pool's count (urllib3#805). The hedger's Pool caps concurrency instead;
        # the pool keeps that many idle keep-alive connections for reuse.
        tls_context = None
        if urlsplit(settings.upstream_url).scheme == "https":
            tls_context = upstream_tls_context(
                settings.upstream_ca_bundle, reuse_sessions=settings.upstream_tls_session_reuse
            )
        adapter = UpstreamAdapter(
            tls_context=tls_context,
            pool_connections=1,
            pool_maxsize=settings.max_upstream_in_flight,
            max_retries=0,
            pool_block=False,
        )
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._adapter = adapter
        # The URL and headers are prepared once. Attempts go to the adapter, not through
        # Session.send: its hooks, cookie merging and redirect machinery are work smart
        # never needs (no redirects are followed, no cookies kept) and were a fifth of
        # an attempt's CPU.
        template = requests.Request(
            "GET", settings.upstream_url, headers={"Accept": "application/json"}
        ).prepare()
        self._url = template.url
        self._headers = dict(template.headers)
        self._template = template

    def close(self) -> None:
        self.session.close()

    @staticmethod
    def held_by_worker(greenlet: gevent.Greenlet) -> bool:
        """Whether the attempt in ``greenlet`` waits for this worker, not the upstream."""
        return held_by_worker(greenlet)

    def _pooled(self) -> list[Any]:
        """The connections in the upstream's pool: open, closed, or placeholders (None).

        The pool attempts use, looked up as ``send`` does: its key includes the TLS
        settings, so ``connection_from_url`` would find (or make) a different one.
        """
        pool = self._adapter.get_connection_with_tls_context(self._template, verify=self._verify)
        return idle_queue(pool)

    def idle_connections(self) -> int:
        """Open connections waiting in the pool for reuse (for leak hunting)."""
        return sum(1 for conn in self._pooled() if getattr(conn, "sock", None) is not None)

    def close_dropped_idle(self) -> int:
        """Close the idle pooled connections the upstream has closed; how many.

        urllib3 looks at a pooled connection only when it takes it out again, so one
        the upstream closed meanwhile (its idle timeout, a restart) would sit in
        CLOSE_WAIT, holding a descriptor, for as long as the pool does not reach it.
        An idle connection that is readable has hit EOF, a reset or stray bytes: dead.
        """
        closed = 0
        for conn in self._pooled():
            sock = getattr(conn, "sock", None)
            if sock is None:
                continue
            poller = _POLL()
            poller.register(sock.fileno(), _READABLE)
            if poller.poll(0):
                conn.close()  # stays in the pool: urllib3 reconnects it when taken
                closed += 1
        return closed

    def fetch_once(
        self,
        number: int,
        t0: float,
        request_id: str,
        limit_s: float | None,
        headers: Mapping[str, str] | None = None,
    ) -> Outcome:
        """Attempt ``number`` of request ``request_id``, which started at ``t0``.

        ``limit_s`` bounds the whole attempt (connect, headers and body): requests'
        own timeout applies to each socket operation, not to the total. None means the
        caller bounds it (the hedger kills attempts at the request's deadline); a
        second timer racing that deadline would turn a 504 into a 502.
        """
        started = time.monotonic()
        prepared = requests.PreparedRequest()
        prepared.method = "GET"
        prepared.url = self._url
        prepared.headers = CaseInsensitiveDict(self._headers)
        prepared.headers[REQUEST_ID_HEADER] = request_id
        prepared.headers[ATTEMPT_HEADER] = str(number)
        if headers:
            prepared.headers.update(headers)
        timer = gevent.Timeout(limit_s)
        status: int | None = None
        limit: Limit | None = None
        exchange: Exchange | None = None
        try:
            timer.start()
            with watch_attempt() as exchange:
                kind, status, body, detail = self._exchange(prepared, number, limit_s, exchange)
        except gevent.Timeout as expired:
            if expired is not timer:
                raise
            kind, body, detail = Kind.TIMEOUT, None, f"no answer within {limit_s:g} s"
            limit = Limit.ATTEMPT
        except Exception as exc:  # noqa: BLE001 - an attempt reports, it never raises
            kind, body, detail = classify(exc), None, describe(exc)
            if connect_timed_out(exc):
                limit = Limit.CONNECT  # a connect_error, or a tls_error of the handshake
            elif kind is Kind.TIMEOUT:
                # Only while connecting does a socket timeout shorter than the attempt's
                # apply: the rest of the exchange reads with the attempt's own limit.
                connecting = exchange is not None and exchange.connecting
                limit = Limit.CONNECT if connecting else Limit.ATTEMPT
        finally:
            timer.close()
        return Outcome(
            number,
            kind,
            started_s=started - t0,
            elapsed_s=time.monotonic() - started,
            status=status,
            body=body,
            detail=detail,
            limit=limit,
            reconnected=exchange is not None and exchange.reconnected,
        )

    def _send(self, prepared: requests.PreparedRequest, timeout: tuple[float, float]) -> Any:
        return self._adapter.send(prepared, stream=True, timeout=timeout, verify=self._verify)

    def _exchange(
        self,
        prepared: requests.PreparedRequest,
        number: int,
        limit_s: float | None,
        exchange: Exchange,
    ) -> tuple[Kind, int | None, bytes | None, str]:
        settings = self._settings
        # A backstop per socket operation; the real limits are the timers above.
        read_s = limit_s if limit_s is not None else settings.max_timeout_ms / 1000
        timeout = (settings.connect_timeout_s, read_s)
        try:
            response = self._send(prepared, timeout)
        except requests.exceptions.ConnectionError:
            if not exchange.stale:
                raise
            # The upstream closed the kept-alive connection as the request went out: it
            # never saw the request. Failing the attempt would spend a hedge on this
            # worker's timing; one new connection at once costs a handshake instead,
            # within the attempt's own limits (docs/DESIGN.md).
            exchange.reconnect()
            if self._on_reconnect is not None:
                self._on_reconnect(number)
            response = self._send(prepared, timeout)
        cap = settings.max_body_bytes
        declared = response.headers.get("Content-Length")
        if declared is not None:
            length = content_length(declared)
            if length is None:
                # RFC 9112 section 6.3: an invalid length leaves the message's end
                # unknown, an unrecoverable framing error; the connection is closed.
                response.close()
                return Kind.RESET, response.status_code, None, f"Content-Length {declared!r:.40}"
            if length > cap:
                response.close()
                return Kind.BODY_TOO_LARGE, response.status_code, None, f"{length} bytes"
        # Reading the whole body, even of a failure, leaves the connection clean for
        # reuse; the cap keeps a huge or endless body from costing more. If the read
        # breaks (or the greenlet is killed), urllib3 closes that connection itself.
        body = response.raw.read(cap + 1, decode_content=True)
        if len(body) > cap:
            response.close()
            return Kind.BODY_TOO_LARGE, response.status_code, None, f"over {cap} bytes"
        if response.status_code != 200:
            return Kind.HTTP_STATUS, response.status_code, None, ""
        if not is_valid_payload(body):
            return Kind.INVALID_PAYLOAD, 200, None, repr(body[:80])
        return Kind.SUCCESS, 200, body, ""
