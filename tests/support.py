"""Real processes for end-to-end tests: smart under gunicorn, on 127.0.0.1 only.

Every wait is bounded, and only processes started here are stopped, by their PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import gevent
import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent

#: Starting gunicorn with two workers importing Flask, requests and gevent takes about
#: a second here; a loaded CI box can take several times that.
START_TIMEOUT_S = 30.0
#: Graceful stop of an idle server is immediate; a busy one gets its in-flight requests'
#: time. Beyond this the test has found a hang, and the process is killed.
STOP_TIMEOUT_S = 20.0
_LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")


class Gunicorn:
    """``gunicorn -c gunicorn.conf.py`` exactly as production starts it, on a free port."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        workers: int = 2,
        extra_args: str = "",
        tmp_path: Path | None = None,
        nofile: int | None = None,
    ) -> None:
        """``nofile``: start gunicorn under ``ulimit -n nofile`` (soft and hard), the
        descriptor limit its workers then inherit."""
        self.env = {
            **os.environ,
            "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:0 --workers {workers} {extra_args}".strip(),
            "SMART_LOG_REQUESTS": "true",
            # A fixed in-flight limit: a loaded CI box makes the event loop late, and
            # the lag limit would turn some of a test's requests into 503s. The tests
            # of the lag limit turn it on themselves.
            "SMART_LOOP_LAG_TARGET_MS": "0",
            **env,
        }
        if tmp_path is not None:
            self.env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
        self.workers = workers
        self.nofile = nofile
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers: list[gevent.Greenlet] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Gunicorn:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
        if self.nofile is not None:
            argv = ["sh", "-c", f'ulimit -n {self.nofile} && exec "$@"', "sh", *argv]
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            gevent.spawn(_collect, self.proc.stdout, self.stdout),
            gevent.spawn(_collect, self.proc.stderr, self.stderr),
        ]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not self.port:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited at start:\n{self.logs()}")
            for line in list(self.stderr) + list(self.stdout):
                if match := _LISTENING.search(line):
                    self.port = int(match.group(1))
            gevent.sleep(0.05)
        if not self.port:
            self.stop()
            raise RuntimeError(f"gunicorn did not start listening:\n{self.logs()}")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # a worker failed to boot: the master halts
                raise RuntimeError(f"gunicorn exited at start:\n{self.logs()}")
            # Every worker has built its app (one "worker ready" line each), not just
            # the one that happened to answer the health check.
            ready = sum('"msg": "worker ready"' in line for line in list(self.stdout))
            if ready >= self.workers and self._healthy():
                return
            gevent.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gunicorn workers did not become healthy:\n{self.logs()}")

    def _healthy(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        gevent.joinall(self._readers, timeout=STOP_TIMEOUT_S)

    def logs(self) -> str:
        return "".join(self.stderr[-50:]) + "".join(self.stdout[-50:])

    def request_lines(self) -> Iterator[dict[str, object]]:
        """The JSON request log lines written so far."""
        for line in list(self.stdout):
            if '"msg": "request"' in line:
                yield json.loads(line)


def _collect(stream: object, into: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.append(line)


def scrape_total(server: Gunicorn, name: str) -> float:
    """The sum of every sample called ``name`` on the server's /metrics."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def wait_until(predicate: object, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; True if it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        gevent.sleep(interval)
    return bool(predicate())  # type: ignore[operator]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
