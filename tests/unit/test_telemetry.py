"""Metrics, log fields and the tracing switch, in-process: no gunicorn, no upstream.

Metrics are read back from each app's own registry (no PROMETHEUS_MULTIPROC_DIR in
the test process); the multiprocess aggregation is checked end to end in
tests/e2e/test_observability.py.
"""

from __future__ import annotations

import json
import logging

import gevent
import pytest
from flask import Flask
from gevent.event import Event
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from smart.app import create_app
from smart.config import ConfigError, Settings
from smart.hedging.hedge import HedgeResult, Trigger
from smart.hedging.outcome import Kind, Outcome
from smart.observability.logs import JsonFormatter
from smart.observability.metrics import Metrics
from smart.observability.telemetry import RequestRecord, Telemetry, log_fields
from smart.observability.tracing import tracing_wanted

#: Nothing listens on the discard port of loopback: every attempt is refused at once.
REFUSED_URL = "http://127.0.0.1:9/api/work"
#: A bound on waiting for something that should happen at once.
PROMPTLY_S = 5.0


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def outcome(number: int, kind: Kind, *, status: int | None = None, sent: bool = True) -> Outcome:
    return Outcome(number, kind, 0.001 * number, 0.05, status=status, sent=sent)


def hedged_result() -> HedgeResult:
    """Attempt 1 answered 503, 2 won, 3 was cancelled before it ever ran."""
    return HedgeResult(
        winner=outcome(2, Kind.SUCCESS, status=200),
        outcomes=(
            outcome(1, Kind.HTTP_STATUS, status=503),
            outcome(2, Kind.SUCCESS, status=200),
            outcome(3, Kind.CANCELLED, sent=False),
        ),
        trigger=Trigger.EARLY_FAILURE,
        hedges_suppressed=0,
        elapsed_s=0.06,
    )


def test_a_finished_request_counts_each_upstream_call_once() -> None:
    registry = CollectorRegistry()
    telemetry = Telemetry(False, Metrics(registry, attempts_per_request=3))
    telemetry.request_finished(RequestRecord("r1", 200, "success", 1000, 0.06, hedged_result()))

    assert sample(registry, "smart_requests_total", code="200", outcome="success") == 1
    assert sample(registry, "smart_upstream_attempts_total", attempt="1", outcome="http_5xx") == 1
    assert sample(registry, "smart_upstream_attempts_total", attempt="2", outcome="success") == 1
    # Attempt 3 never reached the upstream, so it is no upstream call.
    assert sample(registry, "smart_upstream_attempts_total", attempt="3", outcome="cancelled") == 0
    assert sample(registry, "smart_upstream_attempt_duration_seconds_count", outcome="success") == 1
    assert sample(registry, "smart_hedges_total", trigger="early_failure") == 1
    assert sample(registry, "smart_wins_total", attempt="2") == 1
    assert sample(registry, "smart_request_timeout_used_ratio_sum") == pytest.approx(0.06)
    assert sample(registry, "smart_request_duration_seconds_count", outcome="success") == 1


def test_a_shed_request_is_a_rejection_and_calls_nothing() -> None:
    registry = CollectorRegistry()
    telemetry = Telemetry(False, Metrics(registry, attempts_per_request=3))
    telemetry.request_finished(RequestRecord("r2", 503, "overloaded", None, 0.0001, None))

    assert sample(registry, "smart_requests_total", code="503", outcome="overloaded") == 1
    assert sample(registry, "smart_rejected_total", reason="overloaded") == 1
    calls = [
        s.value
        for family in registry.collect()
        if family.name == "smart_upstream_attempts"
        for s in family.samples
        if s.name.endswith("_total")
    ]
    assert calls and sum(calls) == 0


def test_known_series_exist_at_zero_before_any_traffic() -> None:
    registry = CollectorRegistry()
    Metrics(registry, attempts_per_request=3)
    assert (
        registry.get_sample_value(
            "smart_upstream_attempts_total", {"attempt": "3", "outcome": "timeout"}
        )
        == 0
    )
    assert (
        registry.get_sample_value(
            "smart_requests_total", {"code": "504", "outcome": "upstream_timeout"}
        )
        == 0
    )


def test_the_upstream_in_flight_gauge_counts_running_attempts_and_forgets_killed_ones() -> None:
    registry = CollectorRegistry()
    telemetry = Telemetry(False, Metrics(registry, attempts_per_request=3))
    running, never = Event(), Event()

    def fetch(number: int, t0: float, *, headers: object = None) -> Outcome:
        running.set()
        never.wait()
        return outcome(number, Kind.SUCCESS)

    attempt = telemetry.instrument(fetch, None)
    greenlet = gevent.spawn(attempt, 1, 0.0)
    assert running.wait(PROMPTLY_S)
    assert sample(registry, "smart_upstream_attempts_in_flight") == 1
    greenlet.kill(timeout=PROMPTLY_S)
    assert sample(registry, "smart_upstream_attempts_in_flight") == 0


def test_the_log_line_joins_a_request_to_its_attempts() -> None:
    fields = log_fields(RequestRecord("r3", 200, "success", 1000, 0.0612, hedged_result()))
    assert fields["request_id"] == "r3"
    assert fields["status"] == 200
    assert fields["outcome"] == "success"
    assert fields["timeout_ms"] == 1000
    assert fields["elapsed_ms"] == 61.2
    assert fields["winner"] == 2
    assert fields["hedge_trigger"] == "early_failure"
    attempts = fields["attempts"]
    assert isinstance(attempts, list)
    assert [
        (a["attempt"], a["outcome"], a["won"], a["cancelled"], a["sent"]) for a in attempts
    ] == [
        (1, "http_503", False, False, True),
        (2, "success", True, False, True),
        (3, "cancelled", False, True, False),
    ]
    assert {"started_ms", "elapsed_ms", "status"} <= set(attempts[0])


def app_for(**overrides: object) -> Flask:
    settings = Settings(upstream_url=REFUSED_URL, log_requests=False, **overrides)  # type: ignore[arg-type]
    return create_app(settings)


def scrape(app: Flask) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for s in family.samples
    }


def test_two_apps_in_one_process_keep_their_own_metrics() -> None:
    first, second = app_for(), app_for()
    response = first.test_client().get("/api/smart?timeout=2000")
    assert response.status_code == 502
    key = ("smart_requests_total", (("code", "502"), ("outcome", "upstream_failed")))
    assert scrape(first)[key] == 1
    assert scrape(second)[key] == 0
    calls = ("smart_upstream_attempts_total", (("attempt", "1"), ("outcome", "connect_error")))
    assert scrape(first)[calls] == 1


def test_metrics_can_be_turned_off_and_metrics_is_then_a_404() -> None:
    app = app_for(metrics=False)
    assert app.test_client().get("/api/smart?timeout=x").status_code == 400
    response = app.test_client().get("/metrics")
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
    body = response.json
    assert body is not None and body["error"] == "not_found"
    assert "SMART_METRICS" in body["message"]


def test_metrics_and_probes_are_not_counted_as_requests() -> None:
    app = app_for()
    client = app.test_client()
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200
    requests = [v for (name, _), v in scrape(app).items() if name == "smart_requests_total"]
    assert sum(requests) == 0


class BrokenBudget:
    """A hedge budget that fails with a bug, to see how a crashed request is counted."""

    def record_first(self) -> None:
        raise RuntimeError("bug")


def test_a_request_that_crashes_is_counted_as_a_500(caplog: pytest.LogCaptureFixture) -> None:
    app = app_for()
    app.extensions["smart"].budget = BrokenBudget()
    with caplog.at_level(logging.CRITICAL, logger="smart"):
        response = app.test_client().get("/api/smart")
    assert response.status_code == 500
    assert response.json is not None and response.json["error"] == "internal_error"
    key = ("smart_requests_total", (("code", "500"), ("outcome", "internal_error")))
    assert scrape(app)[key] == 1


def test_the_request_log_line_is_one_json_object(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(upstream_url=REFUSED_URL, log_requests=True))
    with caplog.at_level(logging.INFO, logger="smart.request"):
        app.test_client().get("/api/smart", headers={"X-Request-ID": "logged-1"})
    records = [r for r in caplog.records if r.name == "smart.request"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert "\n" not in JsonFormatter().format(records[0])
    assert line["msg"] == "request" and line["request_id"] == "logged-1"
    assert line["status"] == 502 and line["outcome"] == "upstream_failed"
    assert [a["attempt"] for a in line["attempts"]] == [1, 2, 3]


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "smart"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_TRACES_EXPORTER": "none",
            },
            False,
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_off_unless_the_otel_variables_ask_for_it(
    environ: dict[str, str], wanted: bool
) -> None:
    assert tracing_wanted(environ) is wanted


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "jaeger"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    ],
)
def test_an_unsupported_tracing_choice_stops_the_worker_with_the_variables_name(
    environ: dict[str, str],
) -> None:
    with pytest.raises(ConfigError, match="OTEL_"):
        tracing_wanted(environ)
