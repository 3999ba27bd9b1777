"""The in-flight ceiling and connection limit follow the worker's descriptors and memory."""

from __future__ import annotations

import resource

import pytest

from smart.config import AUTO, ConfigError, Settings, describe
from smart.protection import capacity
from smart.protection.admission import InFlightLimiter, LagController
from smart.protection.capacity import (
    BYTES_PER_IN_FLIGHT,
    CONNECTIONS_PER_IN_FLIGHT,
    MEMORY_SHARE,
    RESERVED_DESCRIPTORS,
    plan,
)
from smart.protection.exhaustion import LOG_INTERVAL_S, ExhaustionLog

#: Hedged to 3 attempts, the default.
ATTEMPTS = 3


def descriptors_needed(c: capacity.Capacity, attempts: int = ATTEMPTS) -> int:
    """Every accepted connection, plus the upstream sockets of every admitted request."""
    return c.worker_connections + attempts * c.max_in_flight


@pytest.mark.parametrize("limit", [256, 1024, 20_000, 1_048_576])
def test_the_auto_limits_never_need_more_descriptors_than_the_worker_has(limit: int) -> None:
    c = plan(descriptors=limit, descriptors_at_start=40, attempts_per_request=ATTEMPTS)
    assert c.bound_by == "descriptors"
    assert descriptors_needed(c) <= limit - 40 - RESERVED_DESCRIPTORS
    assert c.max_in_flight < c.worker_connections


def test_the_auto_limits_use_the_descriptors_there_are() -> None:
    c = plan(descriptors=1024, descriptors_at_start=40, attempts_per_request=ATTEMPTS)
    budget = 1024 - 40 - RESERVED_DESCRIPTORS
    # Within one request's worth of descriptors of the budget, none wasted.
    assert budget - descriptors_needed(c) < CONNECTIONS_PER_IN_FLIGHT + ATTEMPTS
    assert c.worker_connections == CONNECTIONS_PER_IN_FLIGHT * c.max_in_flight


def test_more_hedges_mean_fewer_requests_in_flight() -> None:
    unhedged = plan(descriptors=20_000, descriptors_at_start=40, attempts_per_request=1)
    hedged = plan(descriptors=20_000, descriptors_at_start=40, attempts_per_request=ATTEMPTS)
    assert hedged.max_in_flight < unhedged.max_in_flight


def test_memory_bounds_the_ceiling_when_it_runs_out_first() -> None:
    memory = 100 * 1024 * 1024
    c = plan(
        descriptors=1_048_576,
        descriptors_at_start=40,
        attempts_per_request=ATTEMPTS,
        memory_bytes=memory,
        workers=2,
    )
    assert c.bound_by == "memory"
    assert c.max_in_flight == int(memory * MEMORY_SHARE / 2 / BYTES_PER_IN_FLIGHT)


def test_an_operators_cap_is_kept_and_leaves_the_other_descriptors_to_connections() -> None:
    c = plan(
        descriptors=20_000,
        descriptors_at_start=40,
        attempts_per_request=ATTEMPTS,
        max_in_flight=100,
    )
    assert (c.max_in_flight, c.bound_by) == (100, "SMART_MAX_IN_FLIGHT")
    assert c.worker_connections == 20_000 - 40 - RESERVED_DESCRIPTORS - ATTEMPTS * 100


def test_an_operators_connection_limit_bounds_the_auto_cap() -> None:
    c = plan(
        descriptors=20_000,
        descriptors_at_start=40,
        attempts_per_request=ATTEMPTS,
        worker_connections=300,
    )
    assert (c.worker_connections, c.max_in_flight) == (300, 299)


def test_a_cap_at_the_connection_limit_is_refused_with_both_names() -> None:
    with pytest.raises(ConfigError, match=r"CONNECTIONS \(300\) must stay above SMART_MAX_IN"):
        plan(
            descriptors=20_000,
            descriptors_at_start=40,
            attempts_per_request=ATTEMPTS,
            max_in_flight=300,
            worker_connections=300,
        )


def test_auto_is_the_default_and_can_be_asked_for_by_name() -> None:
    defaults = {name: default for name, default, _ in describe()}
    assert defaults["SMART_MAX_IN_FLIGHT"] == AUTO
    assert defaults["SMART_WORKER_CONNECTIONS"] == AUTO
    assert Settings.from_env({"SMART_MAX_IN_FLIGHT": "auto"}).max_in_flight is None
    assert Settings.from_env({"SMART_MAX_IN_FLIGHT": "300"}).max_in_flight == 300
    with pytest.raises(ConfigError, match="SMART_WORKER_CONNECTIONS"):
        Settings.from_env({"SMART_WORKER_CONNECTIONS": "1"})


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lowered = min(soft, hard, 512)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        raised = capacity.raise_descriptor_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert raised == (capacity.UNLIMITED_NOFILE if hard == resource.RLIM_INFINITY else hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_worker_measures_what_it_has() -> None:
    c = capacity.measure(Settings(upstream_url="http://127.0.0.1:9/api/work"))
    assert c.descriptors == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert 0 < c.descriptors_at_start < c.descriptors
    assert descriptors_needed(c) <= c.descriptors


def test_descriptor_failures_are_logged_at_once_then_once_an_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    alarm = ExhaustionLog(clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="smart"):
        for _ in range(50):
            alarm.failed("accept")
        alarm.failed("connect")
        now[0] += LOG_INTERVAL_S / 2
        alarm.flush()
        now[0] += LOG_INTERVAL_S / 2
        alarm.flush()
        alarm.flush()
    counts = [r.failures for r in caplog.records]  # type: ignore[attr-defined]
    assert counts == [{"accept": 1}, {"accept": 49, "connect": 1}]


# --- the lag limit blames the worker only when it is busy itself ----------------------

#: A target of 20 ms decided every 100 ms, as in test_admission.
LAG_TARGET_S, LAG_WINDOW_S = 0.020, 0.100


@pytest.mark.parametrize(("cpu_share", "limit"), [(0.9, 45), (0.2, 256)])
def test_a_late_loop_lowers_the_limit_only_while_the_worker_keeps_its_core_busy(
    cpu_share: float, limit: int
) -> None:
    wall, cpu = [0.0], [0.0]
    limiter = InFlightLimiter(256)
    controller = LagController(
        limiter, 4, LAG_TARGET_S, LAG_WINDOW_S, lambda: wall[0], cpu_clock=lambda: cpu[0]
    )
    for _ in range(50):
        limiter.try_acquire()
    for _ in range(5):  # one window of late wake-ups
        wall[0] += LAG_WINDOW_S * 1.001 / 5
        cpu[0] += LAG_WINDOW_S * 1.001 / 5 * cpu_share
        controller.observe(0.05)
    # Busy: 90% of the 50 in flight. Idle: another process had the core; no change.
    assert limiter.limit == limit
