"""The processes a benchmark point runs against, and what they cost.

gunicorn exactly as production starts it (``gunicorn -c gunicorn.conf.py``), smart or
the naive baseline, in front of the simulator; everything on 127.0.0.1, every wait
bounded, and only processes started here are stopped, by their PID.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: Server logs and other bulky by-products of a run; not committed.
RAW = RESULTS / "raw"

#: Two workers importing Flask, requests and gevent start in about a second; a box
#: busy with other test suites can take several times that.
START_TIMEOUT_S = 30.0
#: An idle server stops at once; a loaded one may still be killing attempts.
STOP_TIMEOUT_S = 15.0
_LISTENING = re.compile(rb"Listening at: http://127\.0\.0\.1:(\d+)")

#: The app each kind of server runs; ``None`` is gunicorn.conf.py's own (smart).
APPS: dict[str, str | None] = {"smart": None, "naive": "bench.naive_app:app"}


class Server:
    """A gunicorn master and its workers, started on a free port of 127.0.0.1."""

    def __init__(self, kind: str, env: Mapping[str, str], log_path: Path, workers: int = 2):
        self.kind = kind
        self.workers = workers
        self.env = {
            **os.environ,
            **env,
            "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:0 --workers {workers}",
            "PYTHONPATH": str(ROOT),
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
        app = APPS[self.kind]
        if app is not None:
            argv.append(app)
        # The request log goes to a file, as it would to a collector: writing it is part
        # of the cost of a request.
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start:\n{self.tail()}")
            if not self.port and (match := _LISTENING.search(self.log_path.read_bytes())):
                self.port = int(match.group(1))
            if self.port and len(self.worker_pids()) == self.workers and self._healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.kind} did not become healthy:\n{self.tail()}")

    def _healthy(self) -> bool:
        # Every worker must answer; a few probes reach both with high probability.
        try:
            return all(
                requests.get(self.url + "/healthz", timeout=1).status_code == 200 for _ in range(4)
            )
        except requests.RequestException:
            return False

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *self.worker_pids()]

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def tail(self) -> str:
        return self.log_path.read_bytes()[-3000:].decode(errors="replace")


@dataclass(frozen=True)
class Usage:
    """Resources of a set of processes at one moment."""

    cpu_s: float  # user + system, since each process started
    user_s: float
    system_s: float
    rss_bytes: int
    fds: int
    upstream_connections: int  # established TCP connections to the upstream's port

    def as_dict(self) -> dict[str, float | int]:
        return {
            "rss_mib": round(self.rss_bytes / 2**20, 1),
            "fds": self.fds,
            "upstream_connections": self.upstream_connections,
        }


def usage(pids: list[int], upstream_port: int | None = None) -> Usage:
    """Summed over ``pids``; processes that have gone away count as nothing."""
    user = system = 0.0
    rss = fds = conns = 0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                times = proc.cpu_times()
                user += times.user
                system += times.system
                rss += proc.memory_info().rss
                fds += proc.num_fds()
            if upstream_port is not None:
                conns += sum(
                    1
                    for c in proc.net_connections(kind="tcp")
                    if c.raddr
                    and c.raddr.port == upstream_port
                    and c.status == psutil.CONN_ESTABLISHED
                )
        except psutil.NoSuchProcess:
            continue
    return Usage(user + system, user, system, rss, fds, conns)
