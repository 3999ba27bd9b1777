"""SMART_UPSTREAM_CA_BUNDLE: read from the environment, checked before the first attempt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from harness.gunicorn import START_TIMEOUT_S
from smart.config import ConfigError, Settings
from tests.support import ROOT, Gunicorn

BUNDLE = "SMART_UPSTREAM_CA_BUNDLE"


def test_the_default_is_requests_own_bundle() -> None:
    assert Settings().upstream_ca_bundle == ""


def test_a_pem_file_with_a_ca_certificate_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    settings = Settings.from_env({BUNDLE: str(path)})
    assert settings.upstream_ca_bundle == str(path)


def test_a_directory_is_accepted(tmp_path: Path) -> None:
    assert Settings.from_env({BUNDLE: str(tmp_path)}).upstream_ca_bundle == str(tmp_path)


def test_a_missing_bundle_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=BUNDLE):
        Settings.from_env({BUNDLE: str(tmp_path / "nope.pem")})


def test_a_file_without_a_certificate_names_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "empty.pem"
    path.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=BUNDLE):
        Settings.from_env({BUNDLE: str(path)})


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
