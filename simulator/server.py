"""The simulated upstream: ``GET /api/work`` with configurable latency and faults.

``make run``, the tests and the benchmark use it in place of the real upstream. A
``/_sim/*`` control API on the same port scripts behaviours and reports what each call
saw, including clients that gave up. Run it with ``python -m simulator``.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import gevent
import gevent.event
from gevent import monkey

from simulator.behaviours import BEHAVIOURS, Call, CallRecord, RawConnection, Step
from simulator.config import RUNTIME_OPTIONS, SimulatorConfig, parse_args
from simulator.http_server import Connection, Request, Response, Server
from simulator.tls import make_run_certificate

__all__ = ["Simulator", "SimulatorConfig", "main"]

WORK_PATH = "/api/work"
RECENT_LIMIT = 1000
MAX_CONTROL_BODY = 1024 * 1024
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
JSON = "application/json"

Reply = tuple[int, dict[str, Any]]
Handler = Callable[[Request, Connection], Reply | None]


class Stats:
    """Counters since the last reset, and the most recent calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.completed = 0
        self.client_closed = 0
        self.connections_total = 0
        # TLS only: full handshakes, resumed sessions, and handshakes the client broke
        # off (an untrusted certificate, a cancelled attempt).
        self.tls_handshakes = 0
        self.tls_resumed = 0
        self.tls_failed = 0
        # By X-Smart-Attempt value: calls per client request is calls over attempt 1s,
        # exact even when a load generator stops with requests still in flight.
        self.calls_by_attempt: Counter[str] = Counter()
        self.recent: deque[CallRecord] = deque(maxlen=RECENT_LIMIT)

    def start(self, headers: Mapping[str, str]) -> CallRecord:
        self.calls += 1
        record = CallRecord(
            id=self.calls,
            request_id=headers.get("x-request-id"),
            attempt=headers.get("x-smart-attempt"),
            traceparent=headers.get("traceparent"),
            started=time.monotonic(),
        )
        self.calls_by_attempt[record.attempt or "none"] += 1
        self.recent.append(record)
        return record

    def end(self, record: CallRecord) -> None:
        if record.client_closed_at is not None:
            record.ended = record.client_closed_at
            self.client_closed += 1
        else:
            record.ended = time.monotonic()
        self.completed += 1


class Simulator:
    """The application: ``/api/work`` plus the ``/_sim`` control API.

    Scripted steps are used first (FIFO, one per call), then the behaviour set for the
    call's ``X-Smart-Attempt`` value, then a draw from the configured default.
    """

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.steps: deque[Step] = deque()
        self.by_attempt: dict[str, Step] = {}
        self.stats = Stats()
        # Gauges of the present: they survive a reset, unlike the counters.
        self.in_flight = 0
        self.connections_open = 0
        self._routes: dict[str, dict[str, Handler]] = {
            WORK_PATH: {"GET": self._get_work},
            "/_sim/script": {"POST": self._post_script},
            "/_sim/reset": {"POST": self._post_reset},
            "/_sim/config": {"GET": self._get_config, "POST": self._post_config},
            "/_sim/stats": {"GET": self._get_stats},
        }

    def handle(self, request: Request, connection: Connection) -> Response | None:
        path, method = request.path, request.method
        methods = self._routes.get(path)
        headers: tuple[tuple[str, str], ...] = ()
        reply: Reply | None
        if methods is None:
            reply = 404, {"error": "not_found", "message": f"no route {path}"}
        elif method not in methods:
            reply = 405, {"error": "method_not_allowed", "message": f"{method} {path}"}
            headers = (("Allow", ", ".join(methods)),)
        else:
            try:
                reply = methods[method](request, connection)
            except ValueError as exc:
                reply = 400, {"error": "bad_request", "message": str(exc)}
        if reply is None:
            return None  # the behaviour wrote (or refused) the response on the socket itself
        status, payload = reply
        return Response(status, JSON, json.dumps(payload).encode(), headers)

    def connection_opened(self) -> None:
        self.connections_open += 1
        self.stats.connections_total += 1

    def connection_closed(self) -> None:
        self.connections_open -= 1

    def handshake_done(self, *, resumed: bool) -> None:
        self.stats.tls_handshakes += 1
        self.stats.tls_resumed += resumed

    def handshake_failed(self) -> None:
        self.stats.tls_failed += 1

    def _get_work(self, request: Request, connection: Connection) -> None:
        """Answer one ``/api/work`` call: choose a step, wait its delay, behave."""
        stats = self.stats
        record = stats.start(request.headers)
        step = self.next_step(record.attempt)
        record.kind = step.label
        conn = RawConnection(
            connection.socket,
            keep_alive=request.keep_alive,
            release=connection.release,
            readable_within=connection.readable_within,
        )
        call = Call(conn, record)
        self.in_flight += 1
        try:
            started = time.monotonic()
            if step.kind == "hang" or call.wait(step.delay_ms / 1000):
                call.slept_ms = round((time.monotonic() - started) * 1000)
                BEHAVIOURS[step.kind](call, step)
        finally:
            self.in_flight -= 1
            stats.end(record)

    def next_step(self, attempt: str | None) -> Step:
        if self.steps:
            return self.steps.popleft()
        if attempt is not None and attempt.strip() in self.by_attempt:
            return self.by_attempt[attempt.strip()]
        config, rng = self.config, self.rng
        if config.mode == "fixed":
            delay_ms = float(config.fixed_ms)
        else:
            delay_ms = rng.uniform(config.min_ms, config.max_ms)
        kind = "ok"
        if rng.random() < config.failure_rate:
            kind = rng.choice(config.failure_kinds)
        return _named_step(kind).delayed(delay_ms)

    def _post_script(self, request: Request, connection: Connection) -> Reply:
        body = _read_json(request)
        if not isinstance(body, dict) or not {"steps", "by_attempt"} & set(body):
            raise ValueError('expected {"steps": [...]} and/or {"by_attempt": {...}}')
        steps, by_attempt = body.get("steps"), body.get("by_attempt")
        if steps is not None and not isinstance(steps, list):
            raise ValueError("steps must be a list")
        if by_attempt is not None and not isinstance(by_attempt, dict):
            raise ValueError("by_attempt must be an object keyed by attempt number")
        # Parse everything before changing anything: a bad script changes nothing.
        parsed_steps = [Step.parse(step) for step in steps or []]
        parsed_by_attempt = {str(k).strip(): Step.parse(v) for k, v in (by_attempt or {}).items()}
        if steps is not None:
            self.steps = deque(parsed_steps)
        if by_attempt is not None:
            self.by_attempt = parsed_by_attempt
        return 200, {"pending_steps": len(self.steps), "by_attempt": sorted(self.by_attempt)}

    def _post_reset(self, request: Request, connection: Connection) -> Reply:
        self.steps.clear()
        self.by_attempt.clear()
        self.stats = Stats()
        self.rng.seed(self.config.seed)  # a seeded sequence replays from its start
        return 200, {"reset": True}

    def _get_config(self, request: Request, connection: Connection) -> Reply:
        return 200, self.config.public()

    def _post_config(self, request: Request, connection: Connection) -> Reply:
        body = _read_json(request)
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object of options")
        if body.get("tls", not self.config.tls) is self.config.tls:
            del body["tls"]  # as GET /_sim/config reported it: no change, so allowed
        self.config = self.config.updated(body, RUNTIME_OPTIONS)
        if "seed" in body:
            self.rng.seed(self.config.seed)
        return 200, self.config.public()

    def _get_stats(self, request: Request, connection: Connection) -> Reply:
        stats = self.stats
        return 200, {
            "calls": stats.calls,
            "calls_by_attempt": dict(stats.calls_by_attempt),
            "in_flight": self.in_flight,
            "completed": stats.completed,
            "client_closed": stats.client_closed,
            "connections_open": self.connections_open,
            "connections_total": stats.connections_total,
            "tls_handshakes": stats.tls_handshakes,
            "tls_resumed": stats.tls_resumed,
            "tls_failed": stats.tls_failed,
            "pending_steps": len(self.steps),
            "now": time.monotonic(),
            "recent": [asdict(record) for record in stats.recent],
        }


@functools.cache
def _named_step(kind: str) -> Step:
    """Kinds drawn from the configuration, parsed once: they were validated with it."""
    return Step.named(kind)


def _read_json(request: Request) -> object:
    """The request's JSON body; None when empty. The server bounds its size."""
    try:
        return json.loads(request.body) if request.body.strip() else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON: {exc}") from None


def serve(config: SimulatorConfig) -> int:
    """Listen until SIGTERM or SIGINT; announce the port as one JSON line on stdout."""
    simulator = Simulator(config)
    certificate = make_run_certificate() if config.tls else None
    server = Server(
        config.host,
        config.port,
        simulator,
        max_body=MAX_CONTROL_BODY,
        tls=None if certificate is None else certificate.context,
    )
    # Handlers first: a signal sent as soon as the port is announced must stop us cleanly.
    stopping = gevent.event.Event()
    handlers = [gevent.signal_handler(signum, stopping.set) for signum in STOP_SIGNALS]
    server.start()
    host, port = server.address
    event: dict[str, object] = {"event": "listening", "host": host, "port": port}
    if certificate is not None:
        event["ca_path"] = certificate.ca_path
    print(json.dumps(event), flush=True)
    stopping.wait()
    for handler in handlers:
        handler.cancel()
    # Calls in flight are cut, not drained: nothing a simulated upstream does is worth
    # finishing, and hung calls would hold the exit for minutes.
    server.stop()
    if certificate is not None:
        certificate.remove()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # First, before the server's sockets exist; imports alone patch nothing.
    monkey.patch_all()
    return serve(parse_args(argv, os.environ))
