"""Prometheus' own binaries for the tests that need them: promtool and the server.

scripts/ensure-prometheus.sh installs them when they are missing (as root, with
apt-get). When they are still missing a test is skipped on a developer's machine but
fails on CI (``CI`` set), where a silent skip would hide the alert and metrics checks.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

from tests.support import ROOT

#: apt-get update and install of one package on a slow mirror.
INSTALL_TIMEOUT_S = 600


@functools.cache
def _ensure() -> str:
    """The install script's complaint, or "" once both binaries are on PATH."""
    if shutil.which("promtool") and shutil.which("prometheus"):
        return ""
    script = ROOT / "scripts" / "ensure-prometheus.sh"
    done = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    if done.returncode == 0 and shutil.which("promtool") and shutil.which("prometheus"):
        return ""
    return (done.stderr or done.stdout).strip() or "promtool/prometheus not found"


def require(binary: str) -> str:
    """The path of ``promtool`` or ``prometheus``; skips (fails on CI) without it."""
    problem = _ensure()
    path = shutil.which(binary)
    if path is not None:
        return path
    message = f"{binary} is not available: {problem}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
