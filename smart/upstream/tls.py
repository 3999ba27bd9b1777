"""The upstream's TLS client context: one per worker, shared by every connection.

Left to requests, each new connection builds its own context and loads the whole CA
bundle into it again (``cert_verify`` sets ``ca_certs`` on the pool at every send),
and a session could never be resumed, since sessions belong to a context. Every
cancelled loser closes its connection, so a worker opens many. Imports only ``ssl``
and requests' bundle path; knows nothing of attempts.
"""

from __future__ import annotations

import errno
import functools
import os
import ssl
from typing import Any

from requests.utils import DEFAULT_CA_BUNDLE_PATH


class TLSHandshakeTimeout(ssl.SSLError):
    """The upstream accepted the connection but did not finish the TLS handshake."""


def upstream_tls_context(ca_bundle: str, *, reuse_sessions: bool) -> ssl.SSLContext:
    """Verification as urllib3 sets it up, with ``ca_bundle`` (or certifi's) loaded once.

    Create it after gevent's patching: its sockets must be gevent's.
    """
    context = _context_class()(ssl.PROTOCOL_TLS_CLIENT)
    context.reuse_sessions = reuse_sessions
    context.sessions = {}
    # urllib3's create_urllib3_context: TLS 1.2 at least, no compression, no TLS 1.2
    # tickets (TLS 1.3 resumes with its own), the host name checked by OpenSSL.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.hostname_checks_common_name = False
    path = ca_bundle or DEFAULT_CA_BUNDLE_PATH
    if os.path.isdir(path):
        context.load_verify_locations(capath=path)
    else:
        context.load_verify_locations(cafile=path)
    made: ssl.SSLContext = context
    return made


def remember_session(context: Any, sock: Any) -> None:
    """After an answer's head: the session, resumable from now on (TLS 1.3 sends its
    tickets after the handshake, so they have been read by now)."""
    remember = getattr(context, "remember", None)
    if remember is not None and sock is not None:
        remember(sock)


@functools.cache
def _context_class() -> type[Any]:
    """The context class, made at first use: ``ssl.SSLContext`` is gevent's by then."""

    class UpstreamTLSContext(ssl.SSLContext):
        """Resumes the last session per host; closes a socket killed mid-handshake."""

        reuse_sessions: bool
        sessions: dict[str | None, ssl.SSLSession]

        def remember(self, sock: ssl.SSLSocket) -> None:
            # Only after a full handshake (or with none kept): reading ``session``
            # copies it through DER, certificate and all (CPython's TLS 1.3 workaround),
            # ~0.3 ms under OpenSSL 3.0. A resumed one leaves the kept session valid;
            # one the upstream refused or let expire ends in a full handshake.
            if not self.reuse_sessions:
                return
            host = sock.server_hostname
            if host in self.sessions and sock.session_reused:
                return
            session = sock.session
            if session is not None:
                self.sessions[host] = session

        def wrap_socket(  # type: ignore[override]
            self,
            sock: Any,
            server_side: bool = False,
            do_handshake_on_connect: bool = True,
            suppress_ragged_eofs: bool = True,
            server_hostname: str | None = None,
            session: ssl.SSLSession | None = None,
        ) -> ssl.SSLSocket:
            if session is None and self.reuse_sessions:
                session = self.sessions.get(server_hostname)
            tls = super().wrap_socket(
                sock,
                server_side=server_side,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=suppress_ragged_eofs,
                server_hostname=server_hostname,
                session=session,
            )
            if not do_handshake_on_connect:
                return tls
            try:
                tls.do_handshake()
            except TimeoutError as exc:
                tls.close()
                # urllib3 would report it as a read timeout; it is the TLS front that
                # hangs. (The TCP connect's own timeout is a ConnectTimeoutError.)
                message = f"TLS handshake not finished within {tls.gettimeout()} s"
                raise TLSHandshakeTimeout(errno.ETIMEDOUT, message) from exc
            except BaseException:
                # Killed mid-handshake (a cancelled attempt): no connection object owns
                # this socket yet; closed now, not when the collector finds it.
                tls.close()
                raise
            return tls

    return UpstreamTLSContext
