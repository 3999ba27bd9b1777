"""``gunicorn -c gunicorn.conf.py`` as production starts it, on a free port of 127.0.0.1.

The one launcher of the tests and the benchmark. Its output goes to files, as it would
to a collector (writing the log is part of a request's cost), and is read back from
them, so it works the same in a gevent-patched test process and in a plain benchmark.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent

#: Two workers importing Flask, requests and gevent start in about a second; a box
#: busy with other test suites can take several times that.
START_TIMEOUT_S = 30.0
#: Graceful stop of an idle server is immediate; a busy one gets its in-flight requests'
#: time. Beyond this the caller has found a hang, and the process is killed.
STOP_TIMEOUT_S = 20.0
#: How often start-up is looked at: short next to a start, long next to a poll's cost.
POLL_S = 0.05
_LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")
_WORKER_READY = '"msg": "worker ready"'


class Gunicorn:
    """A gunicorn master and its workers serving ``app`` (default: smart).

    ``env`` is added to the caller's environment. ``tmp_path`` holds the output files
    and, unless ``env`` names another, the metrics directory; without it the output
    goes to a directory of its own and gunicorn.conf.py makes the metrics directory.
    Ready once every worker answers: smart's workers have each logged "worker ready"
    and ``/healthz`` answers.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        workers: int = 2,
        app: str | None = None,
        extra_args: str = "",
        tmp_path: Path | None = None,
        nofile: int | None = None,
        root: Path = ROOT,
    ) -> None:
        """``nofile``: start gunicorn under ``ulimit -n nofile`` (soft and hard), the
        descriptor limit its workers then inherit. ``root``: the tree to run."""
        self.env = {
            **os.environ,
            **env,
            "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:0 --workers {workers} {extra_args}".strip(),
            "PYTHONPATH": str(root),
        }
        if tmp_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="smart-gunicorn-")
            tmp_path = Path(self._tmp.name)
        else:
            self.env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.app = app
        self.root = root
        self.nofile = nofile
        self.stdout_path = tmp_path / "stdout.log"
        self.stderr_path = tmp_path / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

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
        if self.app is not None:
            argv.append(self.app)
        if self.nofile is not None:
            argv = ["sh", "-c", f'ulimit -n {self.nofile} && exec "$@"', "sh", *argv]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, cwd=self.root, env=self.env, stdout=out, stderr=err)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited at start:\n{self.logs()}")
            if not self.port and (match := _LISTENING.search(_read(self.stderr_path))):
                self.port = int(match.group(1))
            if self.port and self._ready():
                return
            time.sleep(POLL_S)
        self.stop()
        raise RuntimeError(f"gunicorn workers did not become healthy:\n{self.logs()}")

    def _ready(self) -> bool:
        if len(self.worker_pids()) < self.workers:
            return False
        if self.app is None and sum(_WORKER_READY in line for line in self.stdout) < self.workers:
            return False  # every worker has built its app, not just the one that answers
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def pids(self) -> list[int]:
        """The master's and the workers'."""
        assert self.proc is not None
        return [self.proc.pid, *self.worker_pids()]

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
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    @property
    def stdout(self) -> list[str]:
        """The complete lines written to stdout so far (the JSON application log)."""
        return _lines(self.stdout_path)

    @property
    def stderr(self) -> list[str]:
        """The complete lines written to stderr so far (gunicorn's own log)."""
        return _lines(self.stderr_path)

    def logs(self, lines: int = 50) -> str:
        return "".join(self.stderr[-lines:]) + "".join(self.stdout[-lines:])

    def request_lines(self) -> Iterator[dict[str, object]]:
        """The JSON request log lines written so far."""
        for line in self.stdout:
            if '"msg": "request"' in line:
                yield json.loads(line)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _lines(path: Path) -> list[str]:
    lines = _read(path).splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # still being written
    return lines
