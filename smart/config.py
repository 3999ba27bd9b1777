"""Every setting of smart, its default, unit and reason, in one place.

Settings come only from ``SMART_*`` environment variables, read by the workers' app
factory and by ``gunicorn.conf.py`` alike. This module imports the standard library
only: gunicorn's master loads it before gevent patches anything.
"""

from __future__ import annotations

import dataclasses
import math
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

PRODUCTION_UPSTREAM_URL = "https://exponea-engineering-assignment.appspot.com/api/work"
#: What a secret of a URL is replaced with in logs, traces and error messages.
REDACTED = "***"
#: Secrets shorter than this are masked in the URL itself but not searched for in free
#: text (an exception's message): masking "1" or "user" wherever it appears would
#: garble every log line; an API key or a password worth the name is longer.
MIN_SECRET_CHARS = 8


class ConfigError(ValueError):
    """A setting from the environment is missing its rule; the message names it."""


#: The value of a setting that the worker works out at start (``smart/protection/capacity.py``).
AUTO = "auto"
#: Requests in flight assumed by settings whose ``auto`` was not worked out: only an
#: upstream client built on its own (a test) sees it; a worker's runtime resolves it.
UNRESOLVED_IN_FLIGHT = 256


def _setting(
    default: Any, doc: str, *, minimum: float | None = None, auto: type | None = None
) -> Any:
    """``auto``: the type of a setting whose default (None) is worked out at start."""
    return field(default=default, metadata={"doc": doc, "minimum": minimum, "auto": auto})


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration of one worker. Units are in the names."""

    upstream_url: str = _setting(
        PRODUCTION_UPSTREAM_URL,
        "URL of the upstream endpoint that every attempt GETs.",
    )
    upstream_ca_bundle: str = _setting(
        "",
        "PEM file or directory of CA certificates that an https upstream's certificate "
        "must chain to (empty: the certifi bundle requests ships). Verification is "
        "never off.",
    )
    upstream_tls_session_reuse: bool = _setting(
        True,
        "Resume the last TLS session of an https upstream on each new connection, "
        "sparing a full handshake (every cancelled loser closes its connection).",
    )
    hedge_delay_ms: int = _setting(
        300, "Start the hedges this long after attempt 1 if it has not succeeded.", minimum=0
    )
    hedge_fanout: int = _setting(
        2, "How many extra attempts a hedge starts (0 turns hedging off).", minimum=0
    )
    max_timeout_ms: int = _setting(
        60_000, "Largest `timeout` a client may ask for; larger is a 400.", minimum=1
    )
    connect_timeout_ms: int = _setting(
        1_000, "Limit on opening one upstream connection.", minimum=1
    )
    attempt_timeout_ms: int = _setting(
        3_000,
        "Limit on one whole attempt when the client gave no `timeout` "
        "(5x the upstream's slowest normal answer; beyond it the attempt is hung).",
        minimum=1,
    )
    max_body_bytes: int = _setting(
        16_384, "Largest upstream body accepted; a longer one is a failed attempt.", minimum=16
    )
    min_attempt_ms: int = _setting(
        5,
        "Start no attempt with less time than this left before the request's deadline: "
        "it could not succeed, only cost a connection (raise it to the upstream's "
        "fastest answer, ~100 for the production upstream).",
        minimum=0,
    )
    max_in_flight: int | None = _setting(
        None,
        "Requests to /api/smart one worker serves at once; beyond it a 503 is immediate "
        "(auto: what the worker's descriptors and memory afford, see the capacity line "
        "of its start-up log).",
        minimum=1,
        auto=int,
    )
    worker_connections: int | None = _setting(
        None,
        "Client connections one worker accepts; past it they wait in the kernel's listen "
        "queue. Kept above SMART_MAX_IN_FLIGHT so excess load gets a fast 503 (auto: "
        "twice the in-flight ceiling, within the descriptors left).",
        minimum=2,
        auto=int,
    )
    loop_lag_target_ms: int = _setting(
        10,
        "Lower the in-flight limit below SMART_MAX_IN_FLIGHT while the worker's event "
        "loop runs later than this (median over 100 ms), so admitted requests keep close "
        "to the upstream's latency when the worker's core is saturated (0 = off: the "
        "limit stays at SMART_MAX_IN_FLIGHT).",
        minimum=0,
    )
    loop_lag_busy_share: float = _setting(
        0.8,
        "Blame a late event loop on the worker's own load, and lower the in-flight limit, "
        "only while the worker used at least this share of its core over the window: "
        "lag while it idles is another process taking the core, which refusing would "
        "not cure (0 = every late window counts).",
        minimum=0,
    )
    min_in_flight: int = _setting(
        16,
        "The in-flight limit never goes below this, however late the event loop runs.",
        minimum=1,
    )
    retry_after_s: int = _setting(1, "Retry-After sent with a 503.", minimum=0)
    refusal_pause_ms: int = _setting(
        1_000,
        "After a 503 `overloaded`, read nothing more from that connection for this long: "
        "a client that retries at once on it is paced, at no CPU cost (0 = off).",
        minimum=0,
    )
    refusal_pause_max_ms: int = _setting(
        4_000,
        "While the worker is still full when a refusal's pause ends, keep pausing that "
        "connection, one pause at a time, up to this long in all (below "
        "SMART_REFUSAL_PAUSE_MS: one pause only).",
        minimum=0,
    )
    client_write_timeout_ms: int = _setting(
        5_000,
        "Close a client connection whose answer cannot be written for this long: a "
        "client that stops reading (say, one pipelining requests it never reads the "
        "answers of) holds its connection this long at most, not forever.",
        minimum=1,
    )
    debug_endpoints: bool = _setting(
        False, "Serve /debug/runtime (in-flight counts, greenlets) for leak hunting."
    )
    hedge_budget_ratio: float = _setting(
        0.0,
        "Cap hedged attempts at this share of first attempts over the window "
        "(0 = no budget: always hedge, as the contract asks).",
        minimum=0,
    )
    hedge_budget_window_s: int = _setting(
        10, "Sliding window over which the hedge budget is counted.", minimum=1
    )
    hedge_budget_min_per_s: float = _setting(
        1.0,
        "Hedged attempts per second always allowed, so a quiet worker can still hedge.",
        minimum=0,
    )
    # --- The server: read by gunicorn.conf.py in the master ---------------------------
    bind: str = _setting(
        "0.0.0.0:8080", 'Listening address (`GUNICORN_CMD_ARGS="--bind …"` also works).'
    )
    backlog: int = _setting(2048, "Kernel accept queue.", minimum=1)
    graceful_timeout_s: int = _setting(
        65,
        "On SIGTERM, time in-flight requests get to finish (the largest `timeout` plus a margin).",
        minimum=0,
    )
    keepalive_s: int = _setting(5, "Idle time of a client keep-alive connection.", minimum=0)
    worker_heartbeat_s: int = _setting(
        30, "A worker whose event loop is blocked this long is replaced.", minimum=1
    )
    worker_tmp_dir: str = _setting(
        "/dev/shm",
        "Where workers keep their heartbeat files: tmpfs, because a disk-backed /tmp can "
        "stall the heartbeat under I/O load (the default is skipped where it does not exist).",
    )
    access_log: bool = _setting(
        True,
        "gunicorn's JSON access log line, on stdout, for every HTTP request the request "
        "log does not already cover (all paths but `/api/smart`).",
    )
    # --- Logs and metrics -----------------------------------------------------------
    log_level: str = _setting("INFO", "Level of the application's JSON log.")
    log_requests: bool = _setting(True, "Write one JSON line per /api/smart request.")
    metrics: bool = _setting(
        True, "Record Prometheus metrics and serve them on /metrics (off: /metrics is a 404)."
    )

    @property
    def hedge_delay_s(self) -> float:
        return self.hedge_delay_ms / 1000

    @property
    def refusal_pause_s(self) -> float:
        return self.refusal_pause_ms / 1000

    @property
    def refusal_pause_max_s(self) -> float:
        return self.refusal_pause_max_ms / 1000

    @property
    def client_write_timeout_s(self) -> float:
        return self.client_write_timeout_ms / 1000

    @property
    def loop_lag_target_s(self) -> float:
        return self.loop_lag_target_ms / 1000

    @property
    def connect_timeout_s(self) -> float:
        return self.connect_timeout_ms / 1000

    @property
    def attempt_timeout_s(self) -> float:
        return self.attempt_timeout_ms / 1000

    @property
    def min_attempt_s(self) -> float:
        return self.min_attempt_ms / 1000

    @property
    def attempts_per_request(self) -> int:
        return 1 + self.hedge_fanout

    @property
    def max_upstream_in_flight(self) -> int:
        """Upstream attempts one worker can have open at once: the pool's size."""
        in_flight = UNRESOLVED_IN_FLIGHT if self.max_in_flight is None else self.max_in_flight
        return in_flight * self.attempts_per_request

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            minimum = f.metadata["minimum"]
            if value is None and f.metadata["auto"] is not None:
                continue
            if minimum is not None and (not math.isfinite(value) or value < minimum):
                raise ConfigError(f"{env_name(f.name)} must be >= {minimum}, got {value!r}")
        parts = urlsplit(self.upstream_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                "SMART_UPSTREAM_URL must be an absolute http(s) URL, "
                f"got {redact_url(self.upstream_url)!r}"
            )
        if (
            self.worker_connections is not None
            and self.max_in_flight is not None
            and self.worker_connections <= self.max_in_flight
        ):
            raise ConfigError(
                f"SMART_WORKER_CONNECTIONS ({self.worker_connections}) must stay above "
                f"SMART_MAX_IN_FLIGHT ({self.max_in_flight}): past the cap, requests must "
                "reach the worker to get their 503"
            )
        if self.upstream_ca_bundle:
            _check_ca_bundle(self.upstream_ca_bundle)
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"SMART_LOG_LEVEL must be a logging level, got {self.log_level!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``SMART_*`` variable; unset ones keep their default."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is None or raw.strip() == "":
                continue
            auto = f.metadata["auto"]
            if auto is not None and raw.strip().lower() == AUTO:
                continue
            kind = type(f.default) if auto is None else auto
            values[f.name] = _parse(env_name(f.name), raw.strip(), kind)
        return cls(**values)

    def public(self) -> dict[str, Any]:
        """The settings as plain data, for the start-up log line: no secrets."""
        values = dataclasses.asdict(self)
        values["upstream_url"] = redact_url(self.upstream_url)
        return values

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings no log line may show: the upstream URL's credentials and keys."""
        return url_secrets(self.upstream_url)


def redact_url(url: str) -> str:
    """``url`` with its user, password and every query value replaced by ``REDACTED``.

    Credentials or API keys in the upstream URL must not reach logs or traces
    (OpenTelemetry's ``url.full`` convention asks the same).
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = [(key, REDACTED) for key, _ in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> tuple[str, ...]:
    """The user, password and query values of ``url`` as they may appear in a message:
    raw, decoded and percent-encoded; only those of ``MIN_SECRET_CHARS`` or more."""
    parts = urlsplit(url)
    raw = [parts.username or "", parts.password or ""]
    raw += [value for _, value in parse_qsl(parts.query)]
    found = {form for v in raw for form in (v, unquote(v), quote(unquote(v), safe=""))}
    # Longest first, so that a secret containing another is masked whole.
    return tuple(sorted((s for s in found if len(s) >= MIN_SECRET_CHARS), key=len, reverse=True))


def _check_ca_bundle(path: str) -> None:
    """Stop at boot on a bundle that would fail every attempt as a ``tls_error``."""
    name = "SMART_UPSTREAM_CA_BUNDLE"
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(f"{name} directory {path!r} is not readable")
        return  # hashed directories are read lazily, per certificate, by OpenSSL
    if not os.path.isfile(path):
        raise ConfigError(f"{name} must be an existing PEM file or directory, got {path!r}")
    try:
        # Loaded now, not at the first attempt: a file without a certificate in it
        # raises here (OpenSSL's "no certificate or crl found").
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"{name} {path!r} holds no usable CA certificate: {exc}") from None


def env_name(field_name: str) -> str:
    return "SMART_" + field_name.upper()


def describe() -> list[tuple[str, Any, str]]:
    """(variable, default, doc) for every setting: the README's table is this list."""
    return [
        (env_name(f.name), AUTO if f.default is None else f.default, f.metadata["doc"])
        for f in dataclasses.fields(Settings)
    ]


def _parse(name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}"
        ) from None
