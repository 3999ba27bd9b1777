"""How many requests one worker can hold: the arithmetic of descriptors and memory.

``plan`` is pure and testable without a socket; ``measure`` reads the process (and
raises its descriptor limit) once, at worker start. Imports nothing from the package
but ``config``.
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass

from smart.config import ConfigError, Settings

#: Descriptors a worker keeps beyond its connections and those already open at start:
#: log streams reopened, metrics files created on first use, DNS, the odd pipe. A
#: margin, so a full worker still has descriptors for /healthz and /metrics.
RESERVED_DESCRIPTORS = 64
#: Client connections a worker accepts per request it admits: the admitted one and one
#: more, idle between keep-alive requests or paused after its 503. Past that many, a
#: new connection waits in the kernel's listen queue.
CONNECTIONS_PER_IN_FLIGHT = 2
#: Memory one admitted request holds at most: ``make bench``'s capacity point (5 s
#: upstream, every request hedged to 3 calls) measured ~140 KiB per request in flight.
BYTES_PER_IN_FLIGHT = 144 * 1024
#: Share of the memory available at worker start that in-flight requests of all
#: workers may take; the rest is the processes themselves and the rest of the machine.
MEMORY_SHARE = 0.5
#: When the hard descriptor limit is unlimited, the soft one is raised this far: the
#: kernel's default ``fs.nr_open``.
UNLIMITED_NOFILE = 1_048_576


@dataclass(frozen=True, slots=True)
class Capacity:
    """The effective limits of one worker and where they came from."""

    max_in_flight: int
    worker_connections: int
    descriptors: int  # the soft RLIMIT_NOFILE the worker runs with
    descriptors_at_start: int  # open when the limits were decided
    bound_by: str  # "descriptors", "memory" or "SMART_MAX_IN_FLIGHT"

    def public(self) -> dict[str, object]:
        return asdict(self)


def plan(
    *,
    descriptors: int,
    descriptors_at_start: int,
    attempts_per_request: int,
    memory_bytes: int | None = None,
    workers: int = 1,
    max_in_flight: int | None = None,
    worker_connections: int | None = None,
) -> Capacity:
    """The in-flight ceiling and accepted-connection limit these resources afford.

    An admitted request holds one client socket and up to ``attempts_per_request``
    upstream ones (the upstream pool keeps no more idle connections than that in
    all); every other accepted connection holds one. So ``worker_connections +
    attempts_per_request * max_in_flight`` descriptors must stay free. Either figure
    may be given (an operator's override); the other follows (an operator's cap leaves
    every other descriptor to connections). The in-flight ceiling is
    also held to this worker's share of ``memory_bytes`` when it is known.
    """
    budget = max(2, descriptors - descriptors_at_start - RESERVED_DESCRIPTORS)
    bound_by = "SMART_MAX_IN_FLIGHT"
    if max_in_flight is None:
        if worker_connections is None:
            ceiling = budget // (CONNECTIONS_PER_IN_FLIGHT + attempts_per_request)
        else:
            ceiling = min(
                worker_connections - 1, (budget - worker_connections) // attempts_per_request
            )
        bound_by = "descriptors"
        if memory_bytes is not None:
            by_memory = int(memory_bytes * MEMORY_SHARE / max(1, workers) / BYTES_PER_IN_FLIGHT)
            if by_memory < ceiling:
                ceiling, bound_by = by_memory, "memory"
        max_in_flight = max(1, ceiling)
    if worker_connections is None:
        spare = budget - attempts_per_request * max_in_flight
        if bound_by == "SMART_MAX_IN_FLIGHT":
            # An operator's cap leaves the rest of the descriptors to connections:
            # refused ones must reach the app to get their 503 and their pause.
            worker_connections = max(max_in_flight + 1, spare)
        else:
            worker_connections = max(
                max_in_flight + 1, min(max_in_flight * CONNECTIONS_PER_IN_FLIGHT, spare)
            )
    if max_in_flight >= worker_connections:
        raise ConfigError(
            f"SMART_WORKER_CONNECTIONS ({worker_connections}) must stay above "
            f"SMART_MAX_IN_FLIGHT ({max_in_flight}): past the cap, requests must reach the "
            "worker to get their 503"
        )
    return Capacity(max_in_flight, worker_connections, descriptors, descriptors_at_start, bound_by)


def raise_descriptor_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one, as Go's runtime does; the
    soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_NOFILE if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return UNLIMITED_NOFILE if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # a sandbox may forbid it: keep what we have
        return soft
    return target


def descriptors_open() -> int:
    """Descriptors this process has open now (Linux; 0 where it cannot be read)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def memory_available() -> int | None:
    """Memory the kernel says is available without swapping, in bytes, held to the
    cgroup's limit when one is set (a container); None where neither can be read."""
    available: int | None = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as limit:
            raw = limit.read().strip()
        if raw.isdigit():
            available = min(int(raw), available or int(raw))
    except OSError:
        pass
    return available


def measure(settings: Settings) -> Capacity:
    """Raise the descriptor limit and plan this worker's limits from what it has.

    One worker per core is the deployment (gunicorn.conf.py), so the memory is shared
    by ``os.cpu_count()`` workers.
    """
    descriptors = raise_descriptor_limit()
    return plan(
        descriptors=descriptors,
        descriptors_at_start=descriptors_open(),
        attempts_per_request=settings.attempts_per_request,
        memory_bytes=memory_available(),
        workers=os.cpu_count() or 1,
        max_in_flight=settings.max_in_flight,
        worker_connections=settings.worker_connections,
    )
