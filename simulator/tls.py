"""The simulated upstream's HTTPS: a CA and a leaf certificate made for one run.

The CA's certificate is written to a file its caller trusts (``SMART_UPSTREAM_CA_BUNDLE``),
so the service's real verification path is exercised. ``trustme`` is a development
dependency: it is imported only when the simulator is asked for ``--tls``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass

#: The names the leaf certificate is valid for: the simulator listens on loopback only.
LEAF_NAMES = ("127.0.0.1", "localhost")
CA_FILE = "simulator-ca.pem"


@dataclass(frozen=True, slots=True)
class RunCertificate:
    """A server context for the run and where its CA's certificate was written."""

    context: ssl.SSLContext
    ca_path: str
    directory: str

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            shutil.rmtree(self.directory)


def make_run_certificate() -> RunCertificate:
    """A throw-away CA, a leaf for ``LEAF_NAMES`` signed by it, and a server context.

    Call it after gevent's patching: ``ssl.SSLContext`` is then gevent's, whose
    sockets wait cooperatively in the handshake.
    """
    import trustme  # noqa: PLC0415 - a development dependency, needed only here

    authority = trustme.CA()
    leaf = authority.issue_cert(*LEAF_NAMES)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    directory = tempfile.mkdtemp(prefix="smart-simulator-tls-")
    ca_path = os.path.join(directory, CA_FILE)
    authority.cert_pem.write_to_path(ca_path)
    return RunCertificate(context, ca_path, directory)
