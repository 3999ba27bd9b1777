"""Refusals at the WSGI edge: who takes an in-flight slot, what a 503 carries, and how
refusals are logged when there are thousands of them. No sockets, no upstream."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pytest

from smart.app import create_app
from smart.config import Settings
from smart.observability.telemetry import REFUSALS_LOGGED_PER_S, RefusalLog, Telemetry
from smart.protection.admission import InFlightLimiter
from smart.protection.shedding import PausedAnswer, Shedder

REFUSED_URL = "http://127.0.0.1:9/api/work"


class App:
    """A WSGI app that records what it was asked, and whether a slot was held."""

    def __init__(self, limiter: InFlightLimiter) -> None:
        self.limiter = limiter
        self.in_flight_seen: list[int] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.in_flight_seen.append(self.limiter.in_flight)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]


def call(app: Any, path: str, method: str = "GET", **headers: str) -> tuple[str, dict[str, str]]:
    seen: dict[str, Any] = {}

    def start_response(status: str, header_list: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(header_list)

    environ = {"PATH_INFO": path, "REQUEST_METHOD": method}
    environ.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
    b"".join(app(environ, start_response))
    return seen["status"], seen["headers"]


@pytest.fixture
def parts() -> tuple[Shedder, App, InFlightLimiter]:
    limiter = InFlightLimiter(1)
    inner = App(limiter)
    return Shedder(inner, limiter, Telemetry(log_requests=False), retry_after_s=1), inner, limiter


def test_an_api_request_holds_a_slot_while_the_app_answers_and_frees_it_after(
    parts: tuple[Shedder, App, InFlightLimiter],
) -> None:
    shedder, inner, limiter = parts
    assert call(shedder, "/api/smart")[0] == "200 OK"
    assert inner.in_flight_seen == [1]
    assert limiter.in_flight == 0


@pytest.mark.parametrize(("path", "method"), [("/healthz", "GET"), ("/api/smart", "POST")])
def test_other_paths_and_methods_never_take_a_slot_nor_get_shed(
    parts: tuple[Shedder, App, InFlightLimiter], path: str, method: str
) -> None:
    shedder, inner, limiter = parts
    assert limiter.try_acquire()  # the worker is full
    assert call(shedder, path, method)[0] == "200 OK"
    assert inner.in_flight_seen == [1]


def test_a_full_worker_refuses_with_the_error_shape_and_never_calls_the_app(
    parts: tuple[Shedder, App, InFlightLimiter],
) -> None:
    shedder, inner, limiter = parts
    assert limiter.try_acquire()
    status, headers = call(shedder, "/api/smart", x_request_id="client-7")
    assert status == "503 Service Unavailable"
    assert headers["Retry-After"] == "1"
    assert headers["X-Request-ID"] == "client-7"
    assert headers["Content-Type"] == "application/json"
    assert headers["Server-Timing"].startswith("total;dur=")
    assert inner.in_flight_seen == []
    assert limiter.in_flight == 1


def test_a_crashing_request_gives_its_slot_back() -> None:
    app = create_app(Settings(upstream_url=REFUSED_URL, log_requests=False))
    runtime = app.extensions["smart"]

    class BrokenBudget:
        def record_first(self) -> None:
            raise RuntimeError("bug")

    runtime.budget = BrokenBudget()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(logging.getLogger("smart"), "disabled", True)
            assert app.test_client().get("/api/smart").status_code == 500
        assert runtime.limiter.in_flight == 0
    finally:
        runtime.close()


# --- the pause after a refusal ---------------------------------------------------------


def paused(fullness: list[bool], pause_s: float, max_s: float) -> list[float]:
    """The waits of one refused connection's pause, the worker full as ``fullness`` says
    at each check (and full after the list runs out)."""
    waits: list[float] = []
    checks = iter(fullness)
    answer = PausedAnswer(b"{}", pause_s, max_s, lambda: next(checks, True), waits.append)
    assert list(answer) == [b"{}"]
    assert waits == []  # the body goes out before any wait
    answer.close()
    return waits


def test_a_refused_connection_is_read_again_after_one_pause_once_the_worker_has_room() -> None:
    assert paused([False], pause_s=1.0, max_s=4.0) == [1.0]


def test_a_refused_connection_stays_paused_while_the_worker_is_full() -> None:
    assert paused([True, True, False], pause_s=1.0, max_s=4.0) == [1.0, 1.0, 1.0]


def test_the_pause_of_a_refused_connection_never_exceeds_its_maximum() -> None:
    assert paused([], pause_s=1.0, max_s=4.0) == [1.0, 1.0, 1.0, 1.0]
    assert paused([], pause_s=1.0, max_s=2.5) == [1.0, 1.0, 0.5]
    assert paused([], pause_s=1.0, max_s=1.0) == [1.0]


def test_the_shedder_pauses_its_refusals_until_its_limiter_has_room() -> None:
    limiter = InFlightLimiter(1)
    shedder = Shedder(
        App(limiter), limiter, Telemetry(log_requests=False), 1, pause_s=1.0, pause_max_s=3.0
    )
    assert limiter.try_acquire()
    environ = {"PATH_INFO": "/api/smart", "REQUEST_METHOD": "GET"}
    answer = shedder(environ, lambda status, headers: None)
    assert isinstance(answer, PausedAnswer)
    assert (answer.pause_s, answer.max_s) == (1.0, 3.0)
    assert answer.still_full()
    limiter.release()
    assert not answer.still_full()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_only_the_first_refusals_of_each_second_are_logged_one_by_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    refusals = RefusalLog(clock)
    extra = 25
    with caplog.at_level(logging.INFO, logger="smart.request"):
        for n in range(REFUSALS_LOGGED_PER_S + extra):
            refusals.refused(f"r{n}", 0.0001)
        one_by_one = [r for r in caplog.records if r.getMessage() == "request"]
        assert [r.request_id for r in one_by_one] == [  # type: ignore[attr-defined]
            f"r{n}" for n in range(REFUSALS_LOGGED_PER_S)
        ]
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        clock.now += 1  # the next second's first refusal settles the last one's count
        refusals.refused("next", 0.0001)
    (summary,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert summary.count == extra  # type: ignore[attr-defined]
    assert caplog.records[-1].request_id == "next"  # type: ignore[attr-defined]


def test_a_count_still_owed_is_logged_by_the_periodic_flush(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusals = RefusalLog(Clock())
    with caplog.at_level(logging.INFO, logger="smart.request"):
        for n in range(REFUSALS_LOGGED_PER_S + 3):
            refusals.refused(f"r{n}", 0.0001)
        refusals.flush()
        refusals.flush()  # nothing owed twice
    summaries = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [s.count for s in summaries] == [3]  # type: ignore[attr-defined]
