"""The pause after a refusal paces clients that retry at once, and only them: a client
that honours ``Retry-After`` on the same connection has its retry read when it comes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests
from gevent.pool import Pool

from simulator.process import SimulatorProcess
from smart.protection.shedding import GONE, QUIET, RETRIED, PausedAnswer
from tests.support import Gunicorn, wait_until

#: The server's cap; as many requests hang upstream to keep it full.
CAP = 4
#: How long the requests that fill the worker hang before their 504: longer than the
#: polite client's exchange, so the worker stays full throughout.
HANG_TIMEOUT_MS = 6000
#: SMART_RETRY_AFTER_S and SMART_REFUSAL_PAUSE_MS, their defaults.
RETRY_AFTER_S = 1.0
#: A normal request's time, here a refusal's, plus loopback on a loaded CI box.
NORMAL_REQUEST_S = 0.5


def answer(seen: str, full: bool = True) -> tuple[PausedAnswer, list[float], list[float]]:
    """A refusal's pause whose client did ``seen``; the windows watched, the sleeps."""
    windows: list[float] = []
    sleeps: list[float] = []

    def next_bytes(within_s: float) -> str:
        windows.append(within_s)
        return seen

    paused = PausedAnswer(
        b"{}", 1.0, 4.0, lambda: full, sleep=sleeps.append, next_bytes=next_bytes,
        clock=lambda: 0.0,
    )  # fmt: skip
    return paused, windows, sleeps


def test_a_client_that_retries_at_once_is_paused_while_the_worker_is_full() -> None:
    paused, windows, sleeps = answer(RETRIED)
    paused.close()
    assert windows == [0.5]
    assert sleeps == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("seen", [QUIET, GONE])
def test_a_client_that_waits_or_leaves_is_not_paused_any_longer(seen: str) -> None:
    paused, windows, sleeps = answer(seen)
    paused.close()
    assert windows == [0.5]
    assert sleeps == []


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(mode="fixed", fixed_ms=5, failure_rate=0.0) as sim:
        yield sim


@pytest.fixture(scope="module")
def capped(
    simulator: SimulatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    env = {"SMART_UPSTREAM_URL": simulator.work_url, "SMART_MAX_IN_FLIGHT": str(CAP)}
    with Gunicorn(env, workers=1, tmp_path=tmp_path_factory.mktemp("retry")) as server:
        yield server


def test_a_client_honouring_retry_after_on_its_connection_is_answered_on_time(
    capped: Gunicorn, simulator: SimulatorProcess
) -> None:
    simulator.reset()
    simulator.by_attempt({str(n): {"kind": "hang"} for n in (1, 2, 3)})
    hanging = Pool(CAP)
    url = capped.url + "/api/smart"
    for _ in range(CAP):
        hanging.spawn(requests.get, f"{url}?timeout={HANG_TIMEOUT_MS}", timeout=10)
    assert wait_until(lambda: simulator.stats()["in_flight"] == CAP, 5)
    with requests.Session() as client:  # one keep-alive connection
        first = client.get(url, timeout=10)
        refused_at = time.monotonic()
        assert first.status_code == 503
        retry_after = float(first.headers["Retry-After"])
        assert retry_after == RETRY_AFTER_S
        time.sleep(retry_after)  # the client's own politeness, not an ordering of events
        again = client.get(url, timeout=10)
        answered_at = time.monotonic()
    # Still full, so refused again, but at once: not held for a longer pause.
    assert again.status_code == 503
    assert answered_at - refused_at < retry_after + NORMAL_REQUEST_S
    hanging.join(timeout=HANG_TIMEOUT_MS / 1000 + 5)
    simulator.reset()
