"""Prometheus' own binaries for the tests that need them: promtool and the server.

scripts/ensure-prometheus.sh installs them when they are missing (as root, with
apt-get). When they are still missing a test is skipped on a developer's machine but
fails on CI (``CI`` set), where a silent skip would hide the alert and metrics checks.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import ROOT, wait_until

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


#: A Prometheus server on loopback with a throwaway config and storage starts in about
#: a second; a loaded CI box can take several.
PROMETHEUS_START_TIMEOUT_S = 30.0
#: SIGTERM flushes the head block of a tiny TSDB at once.
PROMETHEUS_STOP_TIMEOUT_S = 15.0
#: Scrape (and rule evaluation) interval of the test server: short, so a test waits
#: seconds, not minutes, for its samples.
SCRAPE_INTERVAL_S = 1


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    """``prometheus`` scraping ``target`` every second, its data in ``workdir``.

    Loads ``rule_files`` too, so a test can see that the server accepts them. Stopped
    by its own PID only.
    """

    def __init__(self, target: str, workdir: Path, rule_files: tuple[Path, ...] = ()) -> None:
        self.target = target
        self.workdir = workdir
        self.rule_files = rule_files
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PrometheusServer:
        binary = require("prometheus")
        config = self.workdir / "prometheus.yml"
        rules = "".join(f"  - {path}\n" for path in self.rule_files)
        config.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
            f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + "scrape_configs:\n"
            "  - job_name: smart\n"
            "    metrics_path: /metrics\n"
            "    static_configs:\n"
            f"      - targets: ['{self.target}']\n"
        )
        self.port = free_port()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not wait_until(self._ready, PROMETHEUS_START_TIMEOUT_S, interval=0.1):
            self.stop()
            raise RuntimeError(f"prometheus did not become ready:\n{self.log.read_text()}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{self.log.read_text()}")
        try:
            return requests.get(self.url + "/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=PROMETHEUS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=PROMETHEUS_STOP_TIMEOUT_S)

    def api(self, path: str, **params: str) -> Any:
        response = requests.get(self.url + "/api/v1/" + path, params=params, timeout=10)
        body = response.json()
        assert body.get("status") == "success", body
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's vector: (labels, value) per series."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return [(series["metric"], float(series["value"][1])) for series in data["result"]]

    def value(self, expr: str) -> float | None:
        """The single value of an aggregated query, None while it has no data."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return result[0][1] if result else None
