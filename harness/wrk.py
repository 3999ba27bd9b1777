"""Closed-loop load with wrk: a fixed number of connections, each sending its next
request as soon as the previous answer arrives, for a bounded time.

The one wrk runner of the benchmark and the tools beside it; ``wrk_report.lua``
reports every status, socket error and latency percentile as one JSON line, and the
server's own time of each 200 (its ``Server-Timing`` total).
"""

from __future__ import annotations

import json
import resource
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "wrk_report.lua"
#: A request unanswered this long is a socket error ("timeout"). wrk's default (2 s) is
#: shorter than a request may legitimately take (a hung attempt ends at the 3 s attempt
#: limit, hedges 300 ms later); it must also stay well under a point's duration, or
#: requests that never get an answer (a connection never accepted) go uncounted.
REQUEST_TIMEOUT_S = 5
#: Beyond its duration wrk needs time to open 10,000 connections and to report.
GRACE_S = 60


@dataclass
class LoadResult:
    connections: int
    duration_s: float
    requests: int
    statuses: dict[str, int]
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]  # min, max, mean, stdev
    percentiles_ms: dict[str, float]  # "50" -> ms, "99.9" -> ms ...
    wrk_cpu_s: float
    extra: dict[str, object] = field(default_factory=dict)
    #: The 200s by the server's own time (Server-Timing total), whole ms -> count: the
    #: latency of admitted requests, without any wait in the kernel's accept queue.
    served_ms: dict[int, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def goodput(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def percentile(self, p: float) -> float:
        return self.percentiles_ms[f"{p:g}"]

    def served_percentile(self, p: float) -> float | None:
        """The ``p``-th percentile of ``served_ms`` (upper edge of its 1 ms bucket)."""
        total = sum(self.served_ms.values())
        if not total:
            return None
        rank, seen = p / 100 * total, 0
        for ms in sorted(self.served_ms):
            seen += self.served_ms[ms]
            if seen >= rank:
                return float(ms + 1)
        return float(max(self.served_ms) + 1)


def threads_for(connections: int) -> int:
    # Two wrk threads keep up with any rate this box reaches; one for tiny loads
    # keeps wrk's own share of the CPU small.
    return 1 if connections < 100 else 2


def run_wrk(
    url: str,
    connections: int,
    duration_s: float,
    timeout_s: float = REQUEST_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
) -> LoadResult:
    argv = [
        "wrk",
        f"-t{threads_for(connections)}",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(SCRIPT),
    ]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + GRACE_S, check=False
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}\n{done.stdout}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    lat = data["latency_us"]
    return LoadResult(
        connections=connections,
        duration_s=data["duration_us"] / 1e6,
        requests=data["requests"],
        statuses=data["statuses"],
        socket_errors={k: v for k, v in data["errors"].items() if k != "status"},
        latency_ms={k: lat[k] / 1000 for k in ("min", "max", "mean", "stdev")},
        percentiles_ms={k: v / 1000 for k, v in lat["percentiles"].items()},
        wrk_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        served_ms={int(ms): n for ms, n in data.get("served_ms", {}).items()},
    )
