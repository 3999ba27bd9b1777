"""Runs the simulated upstream as a child process and drives its control API.

Standard library only, so it works whether or not gevent has patched the caller.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

START_TIMEOUT_S = 10.0  # a cold interpreter importing gevent on a loaded box
STOP_TIMEOUT_S = 5.0
CONTROL_TIMEOUT_S = 5.0
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class SimulatorError(RuntimeError):
    """The simulator did not start, or its control API refused a request."""


class SimulatorProcess:
    """A ``python -m simulator`` child on 127.0.0.1 and a free port.

    Options are the command-line options with underscores (``fixed_ms=50``; lists for
    ``failure_kinds``). ``SIMULATOR_*`` variables of the caller are not inherited: the
    child does exactly what its options say, plus whatever ``env`` adds.
    """

    def __init__(
        self, env: Mapping[str, str] | None = None, *, tls: bool = False, **options: object
    ) -> None:
        self.options = options
        self.tls = tls
        self.env = dict(env or {})
        self.port = 0
        #: With ``tls``: the PEM file of the CA that signed this run's certificate.
        self.ca_path = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def work_url(self) -> str:
        return self.url + "/api/work"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> SimulatorProcess:
        argv = [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", "0"]
        if self.tls:
            argv += ["--tls", "true"]
        for name, value in self.options.items():
            if value is not None:
                text = ",".join(value) if isinstance(value, list | tuple) else str(value)
                argv += ["--" + name.replace("_", "-"), text]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIMULATOR_")}
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")])
        )
        env.update(self.env)
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, bufsize=0)
        try:
            self.port = self._read_port()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_port(self) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SimulatorError(f"no listening line within {START_TIMEOUT_S} s")
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self._proc.wait(STOP_TIMEOUT_S)
                    raise SimulatorError(f"simulator exited with {code} before listening")
                line += chunk
        event = json.loads(line)
        if event.get("event") != "listening":
            raise SimulatorError(f"unexpected first line {line!r}")
        self.ca_path = str(event.get("ca_path", ""))
        return int(event["port"])

    def stop(self) -> int | None:
        """SIGTERM this child only, then SIGKILL if it lingers; its exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def wait(self, timeout_s: float) -> int:
        """The exit code once the child has exited; TimeoutExpired if it has not."""
        if self._proc is None:
            raise SimulatorError("not started")
        return self._proc.wait(timeout_s)

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def request(self, method: str, path: str, body: object = None) -> Any:
        """One control request; the decoded JSON answer, or SimulatorError."""
        conn: http.client.HTTPConnection
        if self.tls:
            context = ssl.create_default_context(cafile=self.ca_path)
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=CONTROL_TIMEOUT_S, context=context
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CONTROL_TIMEOUT_S)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {} if data is None else {"Content-Type": "application/json"}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            answer = json.loads(response.read())
        finally:
            conn.close()
        if response.status != 200:
            raise SimulatorError(f"{method} {path}: {response.status} {answer}")
        return answer

    def script(self, steps: Sequence[Mapping[str, object]]) -> Any:
        """Replace the queue of steps; each ``/api/work`` call consumes the next one."""
        return self.request("POST", "/_sim/script", {"steps": list(steps)})

    def by_attempt(self, mapping: Mapping[int | str, Mapping[str, object]]) -> Any:
        """Set a sticky behaviour per ``X-Smart-Attempt`` value, used until reset."""
        return self.request(
            "POST", "/_sim/script", {"by_attempt": {str(k): v for k, v in mapping.items()}}
        )

    def reset(self) -> Any:
        return self.request("POST", "/_sim/reset")

    def configure(self, **options: object) -> Any:
        return self.request("POST", "/_sim/config", options)

    def config(self) -> Any:
        return self.request("GET", "/_sim/config")

    def stats(self) -> Any:
        return self.request("GET", "/_sim/stats")
