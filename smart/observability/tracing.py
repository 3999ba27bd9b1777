"""OpenTelemetry traces: one server span per /api/smart request, one child per attempt.

Off unless the standard ``OTEL_*`` variables ask for it (``tracing_from_env``). The
provider is built per worker by the app factory, after the fork: the batch span
processor runs a thread (a greenlet once gevent has patched) that must not be forked.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from smart.config import ConfigError, redact_url
from smart.hedging.hedge import HedgeResult
from smart.hedging.outcome import Kind

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


class Headers(Protocol):
    """What trace context is read from: a request's headers (werkzeug's or a dict)."""

    def get(self, key: str) -> str | None: ...


#: The only exporter shipped: OTLP over HTTP/protobuf (no gRPC stack in the image).
OTLP_PROTOCOL = "http/protobuf"


def tracing_wanted(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` turns tracing on; an unsupported choice is a ``ConfigError``.

    On when ``OTEL_TRACES_EXPORTER=otlp``, or when it is unset and an OTLP endpoint
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set.
    ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter not in ("", "otlp"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER must be otlp or none, got {exporter!r}")
    wanted = exporter == "otlp" or any(
        environ.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    for name in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        protocol = environ.get(name, "").strip()
        if wanted and protocol not in ("", OTLP_PROTOCOL):
            raise ConfigError(f"{name} must be {OTLP_PROTOCOL}, got {protocol!r}")
    return wanted


def tracing_from_env(environ: Mapping[str, str], upstream_url: str) -> Tracing | None:
    """A ``Tracing`` exporting over OTLP/HTTP in batches, or None when tracing is off.

    Endpoint, headers, sampler, resource and batch sizes are the SDK's own standard
    variables; ``service.name`` defaults to ``smart``.
    """
    if not tracing_wanted(environ):
        return None
    # Imported here: with tracing off a worker does not even load the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    resource = Resource.create({})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "smart"}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider, upstream_url)


class Tracing:
    """Starts request spans on one worker's provider."""

    def __init__(self, provider: TracerProvider, upstream_url: str) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("smart")
        self.propagator = TraceContextTextMapPropagator()
        parts = urlsplit(upstream_url)
        self.attempt_name = f"GET {parts.path or '/'}"
        self.attempt_attributes: dict[str, str | int] = {
            "http.request.method": "GET",
            "url.full": redact_url(upstream_url),
            "server.address": parts.hostname or "",
            "server.port": parts.port or (443 if parts.scheme == "https" else 80),
        }

    def start_request(self, headers: Headers, request_id: str) -> RequestSpan:
        """The server span of a request; it continues the client's trace if it sent one."""
        parent = self.propagator.extract(headers)
        span = self.tracer.start_span(
            "GET /api/smart",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "GET",
                "http.route": "/api/smart",
                "url.path": "/api/smart",
                "smart.request_id": request_id,
            },
        )
        return RequestSpan(self, span)

    def shutdown(self) -> None:
        self.provider.shutdown()


class RequestSpan:
    """One request's spans. Attempt spans end only in ``finish``: whether an attempt
    won or was cancelled is known once the hedger has returned."""

    __slots__ = ("_attempts", "_context", "_tracing", "span")

    def __init__(self, tracing: Tracing, span: trace.Span) -> None:
        self._tracing = tracing
        self.span = span
        self._context = trace.set_span_in_context(span)
        self._attempts: dict[int, tuple[trace.Span, list[int]]] = {}

    @property
    def trace_id(self) -> str | None:
        context = self.span.get_span_context()
        return f"{context.trace_id:032x}" if context.is_valid else None

    def start_attempt(self, number: int) -> dict[str, str]:
        """Start attempt ``number``'s span; the headers that carry it upstream.

        Called in the attempt's own greenlet, which does not inherit the request's
        contextvars: the parent is passed explicitly.
        """
        tracing = self._tracing
        child = tracing.tracer.start_span(
            tracing.attempt_name,
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes={
                **tracing.attempt_attributes,
                "smart.attempt": number,
                "smart.hedged": number > 1,
            },
        )
        self._attempts[number] = (child, [])
        carrier: dict[str, str] = {}
        tracing.propagator.inject(carrier, context=trace.set_span_in_context(child))
        return carrier

    def attempt_ended(self, number: int) -> None:
        """The attempt's greenlet is done (or was killed): its span's end time."""
        self._attempts[number][1].append(time.time_ns())

    def finish(
        self, status: int, outcome: str, timeout_ms: int | None, result: HedgeResult | None
    ) -> None:
        span = self.span
        if result is not None:
            winner = result.winner.attempt if result.winner else None
            for o in result.outcomes:
                started = self._attempts.get(o.attempt)
                if started is None:  # never ran, so never sent: no span
                    continue
                child, ended = started
                cancelled = o.kind is Kind.CANCELLED
                failed = not o.ok and not cancelled
                child.set_attributes(
                    {
                        "smart.hedging.outcome": o.label,
                        "smart.won": o.attempt == winner,
                        "smart.cancelled": cancelled,
                        "smart.failed": failed,
                    }
                )
                if o.status is not None:
                    child.set_attribute("http.response.status_code", o.status)
                if failed:
                    child.set_attribute("error.type", o.label)
                    child.set_status(Status(StatusCode.ERROR, o.detail or o.label))
                child.end(end_time=ended[0] if ended else None)
            span.set_attribute("smart.attempts", result.attempts_started)
            if winner is not None:
                span.set_attribute("smart.winner", winner)
            if result.trigger is not None:
                span.set_attribute("smart.hedge_trigger", result.trigger)
        if timeout_ms is not None:
            span.set_attribute("smart.timeout_ms", timeout_ms)
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("smart.hedging.outcome", outcome)
        if status >= 500:
            span.set_attribute("error.type", outcome)
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()
