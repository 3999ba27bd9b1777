"""The processes a benchmark point runs against, and what they cost.

smart or the naive baseline under gunicorn (``harness.gunicorn``, the tests' launcher
too), in front of the simulator; everything on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import psutil

from harness.gunicorn import ROOT, Gunicorn

RESULTS = ROOT / "bench" / "results"
#: Server logs and other bulky by-products of a run; not committed.
RAW = RESULTS / "raw"

#: The app each kind of server runs; ``None`` is gunicorn.conf.py's own (smart).
APPS: dict[str, str | None] = {"smart": None, "naive": "bench.naive_app:app"}


class Server(Gunicorn):
    """``harness.gunicorn.Gunicorn`` running ``kind`` (smart or the naive baseline),
    with its output in ``RAW / name``."""

    def __init__(self, kind: str, env: Mapping[str, str], name: str, workers: int = 2):
        super().__init__(env, workers=workers, app=APPS[kind], tmp_path=RAW / name)
        self.kind = kind


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
