"""The HTTP adapter under the upstream session: requests' own, minus per-call work
that smart never uses.

CPU spent in the HTTP client is the throughput ceiling of a worker (docs/PERFORMANCE.md
measures each piece). Imports requests and urllib3 only; knows nothing of attempts.
"""

from __future__ import annotations

import select
from typing import Any

import requests
from gevent.monkey import get_original
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

#: The operating system's poll, even after gevent's patching: see ``is_connected``.
_poll = get_original("select", "poll")


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


class _Connection(_LivenessCheck, HTTPConnection):
    pass


class _TLSConnection(_LivenessCheck, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class UpstreamAdapter(HTTPAdapter):
    """``HTTPAdapter`` with a cheap liveness check and a bare ``Response``.

    ``build_response`` skips what requests does for a browser-like client: copying
    headers into a new dict (urllib3's are already case-insensitive), guessing a text
    encoding, and extracting cookies into a jar that smart never sends back.
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}

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
