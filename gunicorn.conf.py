"""gunicorn settings for smart: plain Python, every knob overridable from the environment.

This file must not import smart, requests or anything that opens sockets: gunicorn's
gevent worker monkey-patches *after* reading it, in each worker, and no app is
preloaded so every worker builds its own session and pool after the fork.
"""

import json
import logging
import os
import shutil
import tempfile
import time


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None


# --- Application -------------------------------------------------------------------
# The factory runs once per worker, after the fork and after gevent's patching.
wsgi_app = "smart.app:create_app()"
preload_app = False

# --- Server socket -----------------------------------------------------------------
# Overridden by GUNICORN_CMD_ARGS="--bind ..." (gunicorn's own mechanism).
bind = os.environ.get("SMART_BIND", "0.0.0.0:8080")
# Connections waiting in the kernel while every worker is busy accepting.
backlog = _env_int("SMART_BACKLOG", 2048)

# --- Workers -----------------------------------------------------------------------
# One process per core: the gevent loop of a worker uses one core at most.
workers = _env_int("WEB_CONCURRENCY", os.cpu_count() or 1)
worker_class = "gevent"
# Open client connections one worker accepts. Must stay above SMART_MAX_IN_FLIGHT so
# that requests past the admission cap reach the app and get a fast 503 instead of
# waiting unseen in the kernel backlog.
worker_connections = _env_int("SMART_WORKER_CONNECTIONS", 4096)
# For async workers this is a heartbeat, not a request timeout: a worker whose loop
# has been blocked this long is killed and replaced.
timeout = _env_int("SMART_WORKER_HEARTBEAT_S", 30)
# On SIGTERM in-flight requests get this long to finish: the longest `timeout` a client
# may ask for (SMART_MAX_TIMEOUT_MS, 60 s) plus a margin.
graceful_timeout = _env_int("SMART_GRACEFUL_TIMEOUT_S", 65)
# Idle keep-alive time of client connections, in seconds.
keepalive = _env_int("SMART_KEEPALIVE_S", 5)
# Heartbeat files on tmpfs: a disk-backed /tmp can stall the heartbeat under I/O load.
worker_tmp_dir = os.environ.get("SMART_WORKER_TMP_DIR") or (
    "/dev/shm" if os.path.isdir("/dev/shm") else None
)

# --- Request limits (slow or hostile clients) --------------------------------------
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

# --- Control socket ----------------------------------------------------------------
# gunicorn >= 25.1 opens one under $HOME by default; smart does not use it.
control_socket_disable = True


# --- Logging -----------------------------------------------------------------------
# gunicorn's own lines as JSON, like the application's: the access log on stdout, the
# error log (start-up, worker lifecycle, tracebacks) on stderr. SMART_LOG_LEVEL sets
# both gunicorn's and the application's level.
loglevel = os.environ.get("SMART_LOG_LEVEL", "info").strip().lower() or "info"
# One line per HTTP request of any path; the application's richer line per /api/smart
# request is separate. SMART_ACCESS_LOG=false silences it.
_access_log = os.environ.get("SMART_ACCESS_LOG", "true").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)


class JsonLogFormatter(logging.Formatter):
    """gunicorn's records as one JSON object per line (ts, level, logger, msg, ...).

    Defined here rather than imported from smart: this file must not import the app.
    Access records carry gunicorn's atoms as their args; their quotes come escaped
    for the text format, which JSON does by itself.
    """

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            + f".{int(created % 1 * 1000):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        atoms = record.args if isinstance(record.args, dict) else None
        if record.name == "gunicorn.access" and atoms is not None:
            line.update(_access_fields(atoms))
        else:
            line["msg"] = record.getMessage()
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def _access_fields(atoms: dict) -> dict:
    def text(key: str) -> str | None:
        value = atoms.get(key)
        return value.replace('\\"', '"') if isinstance(value, str) and value != "-" else None

    return {
        "msg": "access",
        "remote_addr": text("h"),
        "method": text("m"),
        "path": text("U"),
        "query": text("q") or None,
        "protocol": text("H"),
        "status": int(atoms["s"]) if str(atoms.get("s", "")).isdigit() else atoms.get("s"),
        "bytes": atoms.get("B"),
        "duration_ms": round(atoms.get("D", 0) / 1000, 1),
        "request_id": text("{x-request-id}o"),
        "user_agent": text("a"),
    }


logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": JsonLogFormatter}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stdout",
        },
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stderr",
        },
        "null": {"class": "logging.NullHandler"},
    },
    "root": {"level": loglevel.upper(), "handlers": ["stdout"]},
    "loggers": {
        "gunicorn.error": {
            "level": loglevel.upper(),
            "handlers": ["stderr"],
            "propagate": False,
            "qualname": "gunicorn.error",
        },
        "gunicorn.access": {
            "level": "INFO" if _access_log else "CRITICAL",
            "handlers": ["stdout" if _access_log else "null"],
            "propagate": False,
            "qualname": "gunicorn.access",
        },
    },
}


# --- Metrics across workers --------------------------------------------------------
# prometheus_client's multiprocess mode: every worker writes its samples to files in
# PROMETHEUS_MULTIPROC_DIR and /metrics merges them. The variable is set before the
# workers are forked so they inherit it; a dead worker's live gauges are dropped.
_created_metrics_dir: list[str] = []


def on_starting(server: object) -> None:
    """Start every run with empty counters: a fresh directory, or the given one wiped."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if not path:
        path = tempfile.mkdtemp(prefix="smart-metrics-")
        _created_metrics_dir.append(path)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        return
    os.makedirs(path, exist_ok=True)
    # Only prometheus_client's files: the directory may be a mount point or shared.
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))


def child_exit(server: object, worker: object) -> None:
    # Imported here, not at the top: prometheus_client picks its multiprocess storage
    # at import time, which must come after on_starting has set the directory.
    from prometheus_client import multiprocess  # noqa: PLC0415

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    for path in _created_metrics_dir:
        shutil.rmtree(path, ignore_errors=True)
