"""The image's own start-up contract, checked without a Docker engine.

The Dockerfile is parsed; exactly the files it COPYs are copied into a temporary
directory, and its CMD is started there with its ENV, as the container would run it.
Then its HEALTHCHECK must pass and SIGTERM must end the server with exit code 0.

What must hold for this test (after the application is merged):
- ``smart.app:create_app()`` serves ``/healthz`` (200), ``/readyz`` (200 when ready)
  and ``/metrics`` (200) using only the files the Dockerfile copies;
- ``gunicorn.conf.py`` accepts an empty ``PROMETHEUS_MULTIPROC_DIR`` and honours
  ``SMART_BIND``; no control socket is created;
- ``python -m simulator --host H --port P`` serves ``/api/work`` (optional: when
  the module is absent the upstream URL points at a closed port, which the health
  endpoints never touch).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Booting gunicorn's master and two gevent workers takes ~1-2 s here; 30 s leaves room
# for a loaded CI machine without letting a hung start block the suite.
BOOT_DEADLINE_S = 30.0
# With no request in flight gunicorn exits within a second of SIGTERM; the graceful
# timeout (65 s) only applies to requests still running, and none are.
SHUTDOWN_DEADLINE_S = 15.0
# The simulator is a single process; it answers its port within a second.
SIMULATOR_DEADLINE_S = 10.0
POLL_INTERVAL_S = 0.1
# Two workers: /metrics must aggregate across processes, which one worker would hide.
WORKERS = "2"


@dataclass
class Image:
    """The parts of the Dockerfile that decide how the container starts."""

    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    user: str | None = None
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    exposed: list[str] = field(default_factory=list)


def logical_lines(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    buffer = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        line = buffer + stripped
        buffer = ""
        instruction, _, arguments = line.partition(" ")
        yield instruction.upper(), arguments.strip()
    assert not buffer, "Dockerfile ends inside a continued line"


def exec_form(arguments: str, instruction: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), (
        f"{instruction} must be in exec form (a JSON list of strings), got {arguments!r}"
    )
    return value


def parse_dockerfile(text: str) -> Image:
    image = Image()
    for instruction, arguments in logical_lines(text):
        if instruction == "WORKDIR":
            image.workdir = os.path.join(image.workdir, arguments)
        elif instruction == "ENV":
            for item in shlex.split(arguments):
                key, sep, value = item.partition("=")
                assert sep, f"ENV must use KEY=VALUE, got {item!r}"
                image.env[key] = value
        elif instruction == "COPY":
            assert "--from" not in arguments, "multi-stage COPY is not modelled here"
            # --chown/--chmod change ownership only; the staged files are ours anyway.
            words = [w for w in shlex.split(arguments) if not w.startswith("--")]
            image.copies.append((words[:-1], words[-1]))
        elif instruction == "USER":
            image.user = arguments
        elif instruction == "EXPOSE":
            image.exposed.extend(arguments.split())
        elif instruction == "CMD":
            image.cmd = exec_form(arguments, "CMD")
        elif instruction == "HEALTHCHECK":
            options = re.findall(r"--([a-z-]+)=(\S+)", arguments)
            image.healthcheck_options = dict(options)
            _, _, command = arguments.partition("CMD ")
            image.healthcheck = exec_form(command.strip(), "HEALTHCHECK CMD")
        elif instruction == "ENTRYPOINT":
            pytest.fail("an ENTRYPOINT would wrap CMD; this test models CMD alone")
    return image


def seconds(duration: str) -> float:
    """Docker durations as used in HEALTHCHECK options: 10s, 500ms, 1m."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, f"unsupported duration {duration!r}"
    value, unit = float(match[1]), match[2]
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


def stage_copies(image: Image, root: Path) -> Path:
    """Copy what the COPY lines copy, to where they put it, under ``root``."""
    workdir = root / image.workdir.lstrip("/")
    workdir.mkdir(parents=True, exist_ok=True)
    for sources, destination in image.copies:
        target = workdir / destination
        # Docker's rules: a directory's contents go into the destination; a file goes
        # into it when it ends with "/" (or names several sources), else becomes it.
        into_dir = destination.endswith("/") or len(sources) > 1
        for source in sources:
            origin = ROOT / source
            assert origin.exists(), f"Dockerfile COPYs {source}, which does not exist"
            if origin.is_dir():
                shutil.copytree(
                    origin,
                    target,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                )
            elif into_dir:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    return workdir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"process exited early with {process.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(POLL_INTERVAL_S)
    pytest.fail(f"nothing listened on 127.0.0.1:{port} within {deadline_s} s")


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def wait_for_status(url: str, expected: int) -> bool:
    deadline = time.monotonic() + BOOT_DEADLINE_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if http_get(url)[0] == expected:
                return True
        time.sleep(POLL_INTERVAL_S)
    return False


@contextlib.contextmanager
def started(
    command: list[str], *, cwd: Path, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` in its own session; whatever is left of it is killed on exit."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            # The session is ours (start_new_session), so its group is this process
            # and its gunicorn workers, nothing else.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=SHUTDOWN_DEADLINE_S)


def run_healthcheck(
    image: Image, *, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """Run the HEALTHCHECK as docker would: each try bounded by --timeout, and tries
    repeated for the start period plus --retries intervals; the last try is returned."""
    options = image.healthcheck_options
    try_timeout_s = seconds(options.get("timeout", "30s"))
    deadline = time.monotonic() + seconds(options.get("start-period", "0s"))
    deadline += int(options.get("retries", "3")) * seconds(options.get("interval", "30s"))
    while True:
        try:
            check = subprocess.run(
                image.healthcheck,
                cwd=cwd,
                env=env,
                capture_output=True,
                timeout=try_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as expired:
            # Docker counts a try that outlives --timeout as a failed one.
            stderr = expired.stderr or b""
            check = subprocess.CompletedProcess(image.healthcheck, 1, b"", stderr + b"timed out")
        if check.returncode == 0 or time.monotonic() > deadline:
            return check
        time.sleep(POLL_INTERVAL_S)


def show(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no output)"


@pytest.fixture(scope="module")
def image() -> Image:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_image_runs_unprivileged_with_exec_form_command(image: Image) -> None:
    assert image.user, "the image must switch to an unprivileged USER"
    uid = image.user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric, non-root uid"
    assert image.cmd[:1] == ["gunicorn"], "gunicorn must be PID 1 to receive SIGTERM"
    assert image.env.get("PYTHONUNBUFFERED") == "1"
    assert image.env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert "8080" in image.exposed
    assert image.env.get("SMART_BIND", "").endswith(":8080")
    assert image.env.get("PROMETHEUS_MULTIPROC_DIR"), "multiprocess metrics need a dir"
    assert image.healthcheck, "the image must declare a HEALTHCHECK"


def test_build_context_lets_through_every_copied_path(image: Image) -> None:
    allowed = {
        line[1:].strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    }
    copied = {source.rstrip("/") for sources, _ in image.copies for source in sources}
    assert copied <= allowed, f".dockerignore drops {sorted(copied - allowed)}"


@pytest.mark.slow
def test_image_command_passes_its_healthcheck_and_stops_cleanly_on_sigterm(
    image: Image, tmp_path: Path
) -> None:
    if importlib.util.find_spec("smart.app") is None:
        pytest.skip("smart.app is not in this tree yet; this test runs once it is merged")
    workdir = stage_copies(image, tmp_path / "image")
    home = tmp_path / "home"
    home.mkdir()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    port = free_port()

    # The image's ENV, then only what a test on a shared host must change: a loopback
    # bind, private writable dirs, the interpreter of this venv first on PATH.
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        **image.env,
        "SMART_BIND": f"127.0.0.1:{port}",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "WEB_CONCURRENCY": WORKERS,
    }
    env.pop("PYTHONPATH", None)

    with contextlib.ExitStack() as stack:
        upstream_port = free_port()
        env["SMART_UPSTREAM_URL"] = f"http://127.0.0.1:{upstream_port}/api/work"
        simulator = importlib.util.find_spec("simulator") is not None
        if simulator:
            command = [sys.executable, "-m", "simulator"]
            command += ["--host", "127.0.0.1", "--port", str(upstream_port)]
            sim_log = tmp_path / "simulator.log"
            sim = stack.enter_context(started(command, cwd=workdir, env=env, log=sim_log))
            wait_for_port(upstream_port, sim, SIMULATOR_DEADLINE_S)

        log = tmp_path / "gunicorn.log"
        server = stack.enter_context(started(image.cmd, cwd=workdir, env=env, log=log))
        wait_for_port(port, server, BOOT_DEADLINE_S)

        check = run_healthcheck(image, cwd=workdir, env=env)
        assert check.returncode == 0, (
            f"HEALTHCHECK failed: {check.stderr.decode(errors='replace')}\n{show(log)}"
        )

        assert wait_for_status(f"http://127.0.0.1:{port}/readyz", 200), show(log)
        # A 200 proves PROMETHEUS_MULTIPROC_DIR as the image sets it up is usable.
        metrics_status, _, _ = http_get(f"http://127.0.0.1:{port}/metrics")
        assert metrics_status == 200, show(log)
        if simulator:
            # Proves SMART_UPSTREAM_URL reached the app; the simulator may fail on
            # purpose, so a 502 is a valid answer too.
            status, content_type, _ = http_get(
                f"http://127.0.0.1:{port}/api/smart?timeout=5000", timeout_s=10
            )
            assert status in (200, 502, 504), show(log)
            assert content_type.startswith("application/json")

        assert not (home / ".gunicorn").exists(), "a control socket was created under HOME"

        server.send_signal(signal.SIGTERM)
        try:
            returncode = server.wait(timeout=SHUTDOWN_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gunicorn still running {SHUTDOWN_DEADLINE_S} s after SIGTERM")
        assert returncode == 0, f"gunicorn exited {returncode} on SIGTERM\n{show(log)}"
