"""What operators see, end to end: gunicorn with two workers in front of the simulated
upstream, scraped by /metrics, by a real Prometheus, and traced over OTLP/HTTP.

Every count is compared with what the test sent and with the simulator's own record
of the calls it received, so the metrics are checked against the world, not against
the code that produces them.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from smart.simulator_process import SimulatorProcess
from tests.prometheus_tools import SCRAPE_INTERVAL_S, PrometheusServer
from tests.support import ROOT, Gunicorn, scrape_total, wait_until

#: Clients at once: enough that both workers accept connections, little for 2 cores.
CONCURRENCY = 10
#: Rounds of first-attempt-only requests sent until both workers have answered some;
#: the kernel hands connections to whichever worker accepts first.
SPREAD_ROUNDS = 10
#: The test reads gunicorn's output through a pipe: a line shows up within ms.
LOGGED_WITHIN_S = 1.0
#: A bound on one batch of requests: far above what it takes, short of a hung suite.
BATCH_TIMEOUT_S = 60.0
#: The simulator notices closed connections within ms; a loaded box is slower.
SETTLE_S = 5.0
#: Requests of the Prometheus check: ~300 upstream calls, under the simulator's
#: record of its last 1000 calls.
PROMETHEUS_REQUESTS = 200
#: The simulator's failure share in the Prometheus check, and how far the measured
#: share of ~300 calls may stray from it by chance (over 4 standard deviations).
FAILURE_RATE = 0.3
FAILURE_RATE_SLACK = 0.1
#: A loser cancelled in the moment it was being sent can vanish before the upstream's
#: server reads it (a reset connection still in its accept queue): smart counts a call
#: the upstream never saw. Seen up to once in ~130 hedges of a loaded 2-core box, and
#: only for cancelled hedges; every other call must match exactly.
CANCEL_RACE_SLACK = 3
#: Prometheus needs a scrape or two after the last request, plus start-up.
SCRAPED_WITHIN_S = 20 * SCRAPE_INTERVAL_S
#: The batch span processor exports every 200 ms here (OTEL_BSP_SCHEDULE_DELAY).
EXPORTED_WITHIN_S = 10.0
#: On SIGTERM a worker waits for its idle keep-alive connections to time out; a short
#: keep-alive keeps each server's stop to about a second.
FAST_STOP = {"SMART_KEEPALIVE_S": "1"}
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "smart-dashboard.json"


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(mode="fixed", fixed_ms=20, failure_rate=0.0) as sim:
        yield sim


@dataclass
class Sent:
    """What the test sent and got back."""

    responses: list[requests.Response] = field(default_factory=list)

    def send(self, server: Gunicorn, count: int, query: str = "", request_id: str = "") -> None:
        def one(n: int) -> None:
            headers = {"X-Request-ID": f"{request_id}-{n}"} if request_id else {}
            url = f"{server.url}/api/smart{query}"
            self.responses.append(requests.get(url, headers=headers, timeout=10))

        pool = Pool(CONCURRENCY)
        for n in range(count):
            pool.spawn(one, n)
        assert pool.join(timeout=BATCH_TIMEOUT_S), "requests did not finish"

    def by_status(self) -> Counter[tuple[str, str]]:
        return Counter(
            (str(r.status_code), "success" if r.ok else r.json()["error"]) for r in self.responses
        )


def served_by(server: Gunicorn) -> set[int]:
    """PIDs of the workers whose request log shows an /api/smart request."""
    lines = (json.loads(line) for line in list(server.stdout) if '"smart.request"' in line)
    return {line["pid"] for line in lines if line.get("msg") == "request"}


@dataclass
class Mix:
    server: Gunicorn
    sent: Sent
    calls: list[dict[str, Any]]
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def total(self, name: str, **labels: str) -> float:
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.metrics.items() if n == name and wanted <= ls)


def hang_all() -> dict[str, dict[str, object]]:
    return {str(n): {"kind": "hang"} for n in (1, 2, 3)}


@pytest.fixture(scope="module")
def mix(simulator: SimulatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mix]:
    """A scripted mix of every kind of answer, sent to a fresh two-worker server."""
    simulator.reset()
    simulator.configure(mode="fixed", fixed_ms=20, failure_rate=0.0)
    env = {"SMART_UPSTREAM_URL": simulator.work_url, **FAST_STOP}
    with Gunicorn(env, workers=2, tmp_path=tmp_path_factory.mktemp("mix")) as server:
        sent = Sent()
        # Attempt 1 answers; ids generated by smart. Until both workers took some.
        for _ in range(SPREAD_ROUNDS):
            sent.send(server, 20, "?timeout=2000")
            if wait_until(lambda: len(served_by(server)) == 2, LOGGED_WITHIN_S):
                break
        # Attempt 1 fails fast, 2 wins after 100 ms, 3 (long since sent) is cancelled.
        simulator.by_attempt(
            {
                "1": {"kind": "status", "status": 503, "delay_ms": 5},
                "2": {"kind": "ok", "delay_ms": 100},
                "3": {"kind": "ok", "delay_ms": 500},
            }
        )
        sent.send(server, 10, "?timeout=2000", "rescued")
        simulator.by_attempt({str(n): {"kind": "status", "status": 500} for n in (1, 2, 3)})
        sent.send(server, 5, "?timeout=2000", "failed")
        # Hedges go out at 300 ms, and everything is cancelled at the 600 ms deadline.
        simulator.by_attempt(hang_all())
        sent.send(server, 5, "?timeout=600", "expired")
        sent.send(server, 5, "?timeout=abc", "invalid")
        simulator.by_attempt({})
        assert wait_until(lambda: simulator.stats()["in_flight"] == 0, SETTLE_S)
        text = requests.get(server.url + "/metrics", timeout=10).text
        metrics = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        yield Mix(server, sent, simulator.stats()["recent"], metrics)


def test_both_workers_served_the_mix(mix: Mix) -> None:
    assert len(served_by(mix.server)) == 2


def test_metrics_count_every_answer_summed_over_both_workers(mix: Mix) -> None:
    by_status = mix.sent.by_status()
    assert by_status[("502", "upstream_failed")] == 5
    assert by_status[("504", "upstream_timeout")] == 5
    assert by_status[("400", "invalid_timeout")] == 5
    for (code, outcome), count in by_status.items():
        assert mix.total("smart_requests_total", code=code, outcome=outcome) == count
    assert mix.total("smart_requests_total") == len(mix.sent.responses)
    assert mix.total("smart_request_duration_seconds_count") == len(mix.sent.responses)


def test_upstream_call_counts_equal_the_calls_the_upstream_received(mix: Mix) -> None:
    received = Counter(call["attempt"] for call in mix.calls)
    assert received["2"] == received["3"] == 10 + 5 + 5
    for attempt in ("1", "2", "3"):
        assert mix.total("smart_upstream_attempts_total", attempt=attempt) == received[attempt]
    assert mix.total("smart_upstream_attempts_total", outcome="http_5xx") == 10 + 15
    assert mix.total("smart_upstream_attempts_total", outcome="cancelled") == 10 + 15


def test_hedges_and_wins_match_the_answers(mix: Mix) -> None:
    winners = Counter(r.headers["X-Smart-Winner"] for r in mix.sent.responses if r.ok)
    for attempt in ("1", "2", "3"):
        assert mix.total("smart_wins_total", attempt=attempt) == winners[attempt]
    hedged = sum(1 for r in mix.sent.responses if r.headers.get("X-Smart-Attempts") == "3")
    assert mix.total("smart_hedges_total") == hedged == 10 + 5 + 5
    assert mix.total("smart_hedges_total", trigger="early_failure") == 15
    assert mix.total("smart_hedges_total", trigger="delay") == 5
    assert mix.total("smart_requests_in_flight") == 0
    assert mix.total("smart_upstream_attempts_in_flight") == 0


def test_every_request_log_line_joins_its_upstream_calls_by_request_id(mix: Mix) -> None:
    ids = {r.headers["X-Request-ID"] for r in mix.sent.responses}
    assert wait_until(
        lambda: {line["request_id"] for line in mix.server.request_lines()} >= ids, SETTLE_S
    )
    lines = {line["request_id"]: line for line in mix.server.request_lines()}
    assert set(lines) == ids
    calls: dict[str, set[int]] = {}
    for call in mix.calls:
        calls.setdefault(call["request_id"], set()).add(int(call["attempt"]))
    assert set(calls) <= ids
    for request_id, line in lines.items():
        sent = {a["attempt"] for a in line.get("attempts", []) if a["sent"]}  # type: ignore[union-attr]
        assert sent == calls.get(request_id, set()), line
        assert {"status", "outcome", "timeout_ms", "elapsed_ms"} <= set(line)


def test_every_line_gunicorn_and_the_app_write_is_one_json_object(mix: Mix) -> None:
    stdout = [json.loads(line) for line in list(mix.server.stdout)]
    stderr = [json.loads(line) for line in list(mix.server.stderr)]
    for line in stdout + stderr:
        assert {"ts", "level", "logger", "msg"} <= set(line), line
    assert any(line["msg"].startswith("Booting worker") for line in stderr)
    # One line per request: /api/smart requests in the request log, the rest in the
    # access log.
    rescued = [line for line in stdout if str(line.get("request_id")).startswith("rescued-")]
    assert len(rescued) == 10
    for line in rescued:
        assert (line["logger"], line["status"], line["query"]) == (
            "smart.request",
            200,
            "timeout=2000",
        )
        assert line["elapsed_ms"] > 0 and line["remote_addr"] == "127.0.0.1"
    access = [line for line in stdout if line["logger"] == "gunicorn.access"]
    assert access and all(line["path"] != "/api/smart" for line in access)


def test_a_real_prometheus_scraping_two_workers_sees_what_was_sent_and_received(
    simulator: SimulatorProcess, tmp_path: Path
) -> None:
    simulator.reset()
    simulator.configure(
        mode="random",
        min_ms=5,
        max_ms=60,
        failure_rate=FAILURE_RATE,
        failure_kinds=["status_500", "status_503", "reset", "html"],
        seed=11,
    )
    # A keep-alive longer than the scrape interval: Prometheus reuses its connection
    # without racing the server's idle close (a failed scrape marks series stale).
    env = {"SMART_UPSTREAM_URL": simulator.work_url, "SMART_KEEPALIVE_S": "3"}
    (tmp_path / "prometheus").mkdir()
    with (
        Gunicorn(env, workers=2, tmp_path=tmp_path) as server,
        PrometheusServer(f"127.0.0.1:{server.port}", tmp_path / "prometheus", (ALERTS,)) as prom,
    ):
        assert wait_until(lambda: prom.value('up{job="smart"}') == 1, SCRAPED_WITHIN_S)
        sent = Sent()
        sent.send(server, PROMETHEUS_REQUESTS)
        assert wait_until(lambda: simulator.stats()["in_flight"] == 0, SETTLE_S)
        calls = Counter(call["attempt"] for call in simulator.stats()["recent"])
        assert wait_until(
            lambda: prom.value("sum(smart_requests_total)") == PROMETHEUS_REQUESTS,
            SCRAPED_WITHIN_S,
        )

        successes = sum(1 for r in sent.responses if r.ok)
        client_success = prom.value(
            'sum(smart_requests_total{outcome="success"}) / sum(smart_requests_total)'
        )
        assert client_success == pytest.approx(successes / PROMETHEUS_REQUESTS)
        hedged = sum(1 for r in sent.responses if r.headers.get("X-Smart-Attempts") == "3")
        assert prom.value("sum(smart_hedges_total)") == hedged
        recorded = {
            labels["attempt"]: value
            for labels, value in prom.query("sum by (attempt) (smart_upstream_attempts_total)")
        }
        cancelled = {
            labels["attempt"]: value
            for labels, value in prom.query(
                'sum by (attempt) (smart_upstream_attempts_total{outcome="cancelled"})'
            )
        }
        # An attempt that met a reset on a kept-alive connection before any answer was
        # sent again on a new one: two calls the simulator saw, one attempt.
        reconnects = {
            labels["attempt"]: value
            for labels, value in prom.query("sum by (attempt) (smart_upstream_reconnects_total)")
        }
        assert recorded["1"] == PROMETHEUS_REQUESTS
        assert calls["1"] == PROMETHEUS_REQUESTS + reconnects["1"]
        for attempt in ("2", "3"):
            unseen = recorded[attempt] + reconnects[attempt] - calls[attempt]
            assert 0 <= unseen <= min(cancelled[attempt], CANCEL_RACE_SLACK), (recorded, calls)
        failed_share = prom.value(
            'sum(smart_upstream_attempts_total{outcome!~"success|cancelled"})'
            ' / sum(smart_upstream_attempts_total{outcome!="cancelled"})'
        )
        assert failed_share is not None
        assert abs(failed_share - FAILURE_RATE) <= FAILURE_RATE_SLACK

        assert_the_rules_load_and_evaluate(prom)
        assert_every_dashboard_query_runs(prom)


def assert_the_rules_load_and_evaluate(prom: PrometheusServer) -> None:
    def healthy() -> bool:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return len(rules) == 6 and all(r["health"] == "ok" for r in rules)

    assert wait_until(healthy, SCRAPED_WITHIN_S), prom.api("rules")


def assert_every_dashboard_query_runs(prom: PrometheusServer) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$job", ".*").replace("$__rate_interval", "1m")
            if not prom.query(expr):  # a syntax error fails inside query()
                empty.append(panel["title"])
    # Rejections and suppressed hedges did not happen: their panels may stay empty.
    assert set(empty) <= {"Rejections (503 overloaded)", "Upstream load added by hedging"}


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint on loopback that keeps every span it receives."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []  # (resource attributes, span)
        self.server = WSGIServer(("127.0.0.1", 0), self.app, log=None)

    def app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        if environ["PATH_INFO"] == "/v1/traces":
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((resource, span) for span in scope_spans.spans)
        start_response("200 OK", [("Content-Type", "application/x-protobuf")])
        return [b""]

    def __enter__(self) -> OtlpReceiver:
        self.server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.stop(timeout=1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"


def attributes_of(span: Any) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return getattr(value, value.WhichOneof("value"))

    return {a.key: plain(a.value) for a in span.attributes}


def test_traces_leave_each_worker_over_otlp_http_when_the_otel_variables_ask(
    simulator: SimulatorProcess, tmp_path: Path
) -> None:
    simulator.reset()
    simulator.configure(mode="fixed", fixed_ms=20, failure_rate=0.0)
    simulator.by_attempt({"1": {"kind": "status", "status": 503, "delay_ms": 5}})
    with OtlpReceiver() as receiver:
        env = {
            "SMART_UPSTREAM_URL": simulator.work_url,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            **FAST_STOP,
        }
        with Gunicorn(env, workers=2, tmp_path=tmp_path) as server:
            response = requests.get(
                server.url + "/api/smart", headers={"X-Request-ID": "otlp-1"}, timeout=10
            )
            assert response.status_code == 200

            def exported() -> list[tuple[dict[str, Any], Any]]:
                servers = [
                    s
                    for s in receiver.spans
                    if attributes_of(s[1]).get("smart.request_id") == "otlp-1"
                ]
                if not servers:
                    return []
                trace_id = servers[0][1].trace_id
                return [s for s in receiver.spans if s[1].trace_id == trace_id]

            assert wait_until(lambda: len(exported()) == 4, EXPORTED_WITHIN_S), receiver.spans
    spans = exported()
    assert {resource["service.name"] for resource, _ in spans} == {"smart"}
    (server_span,) = [s for _, s in spans if not s.parent_span_id]
    attempts = {attributes_of(s)["smart.attempt"]: s for _, s in spans if s.parent_span_id}
    assert set(attempts) == {1, 2, 3}
    assert {s.parent_span_id for s in attempts.values()} == {server_span.span_id}
    sent = {
        int(c["attempt"]): c["traceparent"]
        for c in simulator.stats()["recent"]
        if c["request_id"] == "otlp-1"
    }
    for number, span in attempts.items():
        assert sent[number].split("-")[2] == span.span_id.hex()


def healthy(server: Gunicorn) -> bool:
    try:
        return requests.get(server.url + "/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_each_start_counts_from_zero_in_a_reused_metrics_directory(
    simulator: SimulatorProcess, tmp_path: Path
) -> None:
    simulator.reset()
    simulator.configure(mode="fixed", fixed_ms=5, failure_rate=0.0)
    env = {"SMART_UPSTREAM_URL": simulator.work_url, **FAST_STOP}
    with Gunicorn(env, workers=1, tmp_path=tmp_path) as first:
        Sent().send(first, 3)
        assert scrape_total(first, "smart_requests_total") == 3
    assert list((tmp_path / "metrics").glob("*.db"))
    with Gunicorn(env, workers=1, tmp_path=tmp_path) as second:
        assert scrape_total(second, "smart_requests_total") == 0


def test_without_a_metrics_directory_gunicorn_makes_one_and_removes_it_at_exit(
    simulator: SimulatorProcess, tmp_path: Path
) -> None:
    simulator.reset()
    simulator.configure(mode="fixed", fixed_ms=5, failure_rate=0.0)
    env = {"SMART_UPSTREAM_URL": simulator.work_url, "TMPDIR": str(tmp_path), **FAST_STOP}
    with Gunicorn(env, workers=2) as server:
        assert "PROMETHEUS_MULTIPROC_DIR" not in server.env
        (made,) = tmp_path.glob("smart-metrics-*")
        Sent().send(server, 6)
        assert scrape_total(server, "smart_requests_total") == 6
    assert not made.exists()


def test_a_dead_workers_counts_stay_in_the_totals_and_its_gauges_go(
    simulator: SimulatorProcess, tmp_path: Path
) -> None:
    simulator.reset()
    simulator.configure(mode="fixed", fixed_ms=5, failure_rate=0.0)
    env = {"SMART_UPSTREAM_URL": simulator.work_url, **FAST_STOP}
    with Gunicorn(env, workers=1, tmp_path=tmp_path) as server:
        Sent().send(server, 4)
        (worker,) = server.worker_pids()
        gauges = tmp_path / "metrics" / f"gauge_livesum_{worker}.db"
        assert gauges.exists()
        os.kill(worker, signal.SIGKILL)  # a worker of the gunicorn this test started
        assert wait_until(lambda: server.worker_pids() not in ([], [worker]), SETTLE_S)
        assert wait_until(lambda: healthy(server), SETTLE_S)
        assert not gauges.exists()
        Sent().send(server, 2)
        assert scrape_total(server, "smart_requests_total") == 6
