"""Traces of a hedged request: the app in-process with an in-memory exporter, in front
of the simulated upstream over real sockets, which records the traceparent it got."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from simulator.process import SimulatorProcess
from smart.app import create_app
from smart.config import Settings
from tests.support import wait_until

#: The client's own trace, as a W3C traceparent: smart's server span continues it.
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
#: The simulator notices a closed connection within a few ms; a loaded box is slower.
CLOSED_WITHIN_S = 2.0


pytestmark = pytest.mark.usefixtures("clean_simulator")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def traced_app(simulator: SimulatorProcess, exporter: InMemorySpanExporter) -> Flask:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(upstream_url=simulator.work_url, log_requests=False)
    return create_app(settings, tracer_provider=provider)


def calls_of(simulator: SimulatorProcess, request_id: str) -> dict[int, dict[str, Any]]:
    return {
        int(c["attempt"]): c for c in simulator.stats()["recent"] if c["request_id"] == request_id
    }


def test_a_hedged_request_is_a_server_span_with_one_child_span_per_attempt(
    simulator: SimulatorProcess, exporter: InMemorySpanExporter
) -> None:
    simulator.by_attempt(
        {
            "1": {"kind": "status", "status": 503, "delay_ms": 5},
            "2": {"kind": "ok", "delay_ms": 30},
            "3": {"kind": "hang"},
        }
    )
    app = traced_app(simulator, exporter)
    response = app.test_client().get(
        "/api/smart?timeout=3000",
        headers={"X-Request-ID": "traced-1", "traceparent": CLIENT_TRACEPARENT},
    )
    assert response.status_code == 200
    assert response.headers["X-Smart-Winner"] == "2"

    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    assert f"{server.context.trace_id:032x}" == CLIENT_TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CLIENT_SPAN_ID
    assert server.attributes is not None
    assert server.attributes["smart.request_id"] == "traced-1"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["smart.winner"] == 2
    assert server.attributes["smart.hedge_trigger"] == "early_failure"

    children = {s.attributes["smart.attempt"]: s for s in spans if s.kind is SpanKind.CLIENT}  # type: ignore[index]
    assert set(children) == {1, 2, 3}
    for child in children.values():
        assert child.parent is not None and child.parent.span_id == server.context.span_id
        assert child.context.trace_id == server.context.trace_id
    assert_attempt(children[1], hedged=False, won=False, cancelled=False, failed=True)
    assert children[1].status.status_code is StatusCode.ERROR
    assert children[1].attributes["http.response.status_code"] == 503  # type: ignore[index]
    assert_attempt(children[2], hedged=True, won=True, cancelled=False, failed=False)
    assert_attempt(children[3], hedged=True, won=False, cancelled=True, failed=False)
    assert children[3].status.status_code is StatusCode.UNSET

    # Each attempt carried its own span's context upstream.
    calls = calls_of(simulator, "traced-1")
    for number, child in children.items():
        expected = f"00-{CLIENT_TRACE_ID}-{child.context.span_id:016x}-01"
        assert calls[number]["traceparent"] == expected
    assert wait_until(lambda: calls_of(simulator, "traced-1")[3]["client_closed"], CLOSED_WITHIN_S)


def assert_attempt(
    span: ReadableSpan, *, hedged: bool, won: bool, cancelled: bool, failed: bool
) -> None:
    attributes = span.attributes
    assert attributes is not None
    assert (
        attributes["smart.hedged"],
        attributes["smart.won"],
        attributes["smart.cancelled"],
        attributes["smart.failed"],
    ) == (hedged, won, cancelled, failed), dict(attributes)


def test_a_request_without_a_client_trace_starts_its_own(
    simulator: SimulatorProcess, exporter: InMemorySpanExporter
) -> None:
    app = traced_app(simulator, exporter)
    response = app.test_client().get("/api/smart", headers={"X-Request-ID": "traced-2"})
    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    assert server.parent is None
    (child,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    version, trace_id, parent_id, flags = calls_of(simulator, "traced-2")[1]["traceparent"].split(
        "-"
    )
    assert (version, trace_id, parent_id) == (
        "00",
        f"{server.context.trace_id:032x}",
        f"{child.context.span_id:016x}",
    )
    assert int(flags, 16) & 1  # sampled


def test_a_rejected_request_is_a_server_span_with_an_error_and_no_children(
    simulator: SimulatorProcess, exporter: InMemorySpanExporter
) -> None:
    app = traced_app(simulator, exporter)
    assert app.test_client().get("/api/smart?timeout=abc").status_code == 400
    (server,) = exporter.get_finished_spans()
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 400
    assert server.attributes["smart.hedging.outcome"] == "invalid_timeout"
    assert simulator.stats()["calls"] == 0


def test_without_tracing_nothing_is_propagated_upstream(simulator: SimulatorProcess) -> None:
    app = create_app(Settings(upstream_url=simulator.work_url, log_requests=False))
    response = app.test_client().get(
        "/api/smart", headers={"X-Request-ID": "untraced", "traceparent": CLIENT_TRACEPARENT}
    )
    assert response.status_code == 200
    assert calls_of(simulator, "untraced")[1]["traceparent"] is None
