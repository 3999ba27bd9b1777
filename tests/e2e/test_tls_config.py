"""A missing SMART_UPSTREAM_CA_BUNDLE stops gunicorn at boot, naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.gunicorn import START_TIMEOUT_S
from tests.support import ROOT, Gunicorn

BUNDLE = "SMART_UPSTREAM_CA_BUNDLE"


def test_a_missing_bundle_stops_the_worker_at_boot(tmp_path: Path) -> None:
    env = {
        "SMART_UPSTREAM_URL": "https://127.0.0.1:9/api/work",
        BUNDLE: str(tmp_path / "missing.pem"),
    }
    # The environment Gunicorn() gives a server; run to its end: a worker that fails
    # to boot makes the master exit, and nothing is left to stop.
    server = Gunicorn(env, workers=1, tmp_path=tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
        cwd=ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    assert done.returncode != 0
    assert f"{BUNDLE} must be an existing PEM file" in done.stdout + done.stderr
