"""How long clients that pipeline requests and never read the answers hold smart.

``python -m bench.slow_readers`` starts smart (2 workers, gunicorn as production
starts it) in front of the simulator answering in 1 ms, opens ``--connections``
connections on 127.0.0.1, pipelines ``--pipelined`` requests on each and reads
nothing. It reports, at ``--snapshot-s``, what the kernel queues for each connection
on smart's side (``ss``) and again at the end, and when each connection was closed by
the workers, up to ``--max-s``. To measure another tree, copy this file into it and
run it there (``git archive COMMIT | tar -x -C DIR``). Every wait is bounded; only
processes started here are stopped.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import psutil  # noqa: E402

from harness.gunicorn import Gunicorn  # noqa: E402
from simulator.process import SimulatorProcess  # noqa: E402

#: How often the connections held are counted.
POLL_S = 0.1


def held(pids: list[int], ports: set[int]) -> set[int]:
    """The client ports whose connection a worker still holds open."""
    found = set()
    for pid in pids:
        for conn in psutil.Process(pid).net_connections("tcp"):
            if conn.raddr and conn.raddr.port in ports and conn.status == "ESTABLISHED":
                found.add(conn.raddr.port)
    return found


def send_queues(port: int) -> list[int]:
    """Bytes queued in smart's send buffers, one figure per client connection."""
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sorted(int(line.split()[1]) for line in out.splitlines() if line.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=5)
    parser.add_argument("--pipelined", type=int, default=20_000)
    parser.add_argument("--snapshot-s", type=float, default=4.0)
    parser.add_argument("--max-s", type=float, default=60.0)
    args = parser.parse_args()

    request = b"GET /api/smart HTTP/1.1\r\nHost: smart\r\n\r\n" * args.pipelined
    with (
        SimulatorProcess(mode="fixed", fixed_ms=1, failure_rate=0.0) as sim,
        Gunicorn(
            {"SMART_UPSTREAM_URL": sim.work_url, "SMART_LOG_REQUESTS": "false"},
            tmp_path=Path(tempfile.mkdtemp(prefix="slow-readers-")),
        ) as server,
    ):
        pids = server.worker_pids()
        socks = [
            socket.create_connection(("127.0.0.1", server.port)) for _ in range(args.connections)
        ]
        ports = {s.getsockname()[1] for s in socks}
        started = time.monotonic()
        senders = [gevent.spawn(s.sendall, request) for s in socks]
        closed_at: dict[int, float] = {}
        snapshot: list[int] | None = None
        try:
            while time.monotonic() - started < args.max_s and len(closed_at) < len(ports):
                now = time.monotonic() - started
                for port in ports - held(pids, ports) - set(closed_at):
                    closed_at[port] = now
                if snapshot is None and now >= args.snapshot_s:
                    snapshot = send_queues(server.port)
                gevent.sleep(POLL_S)
            last = send_queues(server.port)
        finally:
            for sender in senders:
                sender.kill(block=False)
            for s in socks:
                s.close()
        warnings = sum("did not read its answers" in line for line in server.stderr)
    times = ", ".join(f"{t:.1f}" for t in sorted(closed_at.values()))
    print(f"connections: {args.connections}, each pipelining {args.pipelined} requests")
    print(f"smart's send queues at {args.snapshot_s:g} s (bytes): {snapshot}")
    print(f"smart's send queues at the end (bytes): {last}")
    print(
        f"closed by smart at (s): [{times}]; still held after {args.max_s:g} s: "
        f"{len(ports) - len(closed_at)}; warnings logged: {warnings}"
    )


if __name__ == "__main__":
    main()
