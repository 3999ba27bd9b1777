"""gunicorn settings for smart: plain Python, every knob from ``smart.config.Settings``.

Of smart this file imports only ``smart.config`` (and names ``smart.observability.logs``), which use
the standard library alone; never requests or anything that opens sockets: gunicorn's
gevent worker monkey-patches *after* reading it, in each worker, and no app is
preloaded so every worker builds its own session and pool after the fork
(tests/unit/test_gunicorn_conf.py checks what loading it imports).
"""

import os
import shutil
import tempfile
from typing import Any

# Standard library only, like this file: see smart/config.py and smart/observability/logs.py.
from smart.config import ConfigError, Settings

try:
    settings = Settings.from_env()
except ConfigError as error:
    raise SystemExit(f"smart: {error}") from None


def _web_concurrency() -> int:
    """Worker processes: ``WEB_CONCURRENCY`` (the platforms' convention), else one per core."""
    raw = os.environ.get("WEB_CONCURRENCY", "").strip()
    if not raw:
        return os.cpu_count() or 1
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"WEB_CONCURRENCY must be a positive integer, got {raw!r}")
    return int(raw)


# --- Application -------------------------------------------------------------------
# The factory runs once per worker, after the fork and after gevent's patching.
wsgi_app = "smart.app:create_app()"
preload_app = False

# --- Server socket -----------------------------------------------------------------
# Overridden by GUNICORN_CMD_ARGS="--bind ..." (gunicorn's own mechanism).
bind = settings.bind
# Connections waiting in the kernel while every worker is busy accepting.
backlog = settings.backlog

# --- Workers -----------------------------------------------------------------------
# One process per core: the gevent loop of a worker uses one core at most.
workers = _web_concurrency()
# gunicorn's gevent worker (`-k gevent`), except that the errors gunicorn answers
# itself (414, 431, 400) are JSON like every other response. Resolved by name in the
# master; smart/lifecycle/worker.py imports nothing but gunicorn.
worker_class = "smart.lifecycle.worker.JsonErrorsGeventWorker"
# Open client connections one worker accepts; Settings checks that it stays above
# SMART_MAX_IN_FLIGHT, so that requests past the admission cap reach the app and get
# a fast 503 instead of waiting unseen in the kernel backlog.
worker_connections = settings.worker_connections
# For async workers this is a heartbeat, not a request timeout: a worker whose loop
# has been blocked this long is killed and replaced.
timeout = settings.worker_heartbeat_s
# On SIGTERM in-flight requests get this long to finish: the longest `timeout` a client
# may ask for (SMART_MAX_TIMEOUT_MS, 60 s) plus a margin.
graceful_timeout = settings.graceful_timeout_s
# Idle keep-alive time of client connections, in seconds.
keepalive = settings.keepalive_s
# Heartbeat files on tmpfs: a disk-backed /tmp can stall the heartbeat under I/O load.
worker_tmp_dir = (
    settings.worker_tmp_dir
    if os.path.isdir(settings.worker_tmp_dir) or "SMART_WORKER_TMP_DIR" in os.environ
    else None
)

# --- Request limits (slow or hostile clients) --------------------------------------
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

# --- Control socket ----------------------------------------------------------------
# gunicorn >= 25.1 opens one under $HOME by default; smart does not use it.
control_socket_disable = True

# --- Logging -----------------------------------------------------------------------
# gunicorn's own lines as JSON by the application's formatter (secrets of the upstream
# URL masked): the access log on stdout, the error log (start-up, worker lifecycle,
# tracebacks) on stderr. SMART_LOG_LEVEL sets both gunicorn's and the application's
# level. The access log has a line for every request the request log does not cover
# (smart/observability/access_log.py); SMART_ACCESS_LOG=false silences it.
loglevel = settings.log_level.lower()
logger_class = "smart.observability.access_log.JsonAccessLogger"
_json = {"()": "smart.observability.logs.JsonFormatter", "secrets": list(settings.secrets)}
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": _json},
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
    "root": {"level": settings.log_level.upper(), "handlers": ["stdout"]},
    "loggers": {
        "gunicorn.error": {
            "level": settings.log_level.upper(),
            "handlers": ["stderr"],
            "propagate": False,
            "qualname": "gunicorn.error",
        },
        "gunicorn.access": {
            "level": "INFO" if settings.access_log else "CRITICAL",
            "handlers": ["stdout" if settings.access_log else "null"],
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


def on_starting(server: Any) -> None:
    """Start every run with empty counters: a fresh directory, or the given one wiped.

    Not on a USR2 re-exec (``master_pid`` set): the old master's workers still write
    there, and the new ones carry on from their totals.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if not path:
        path = tempfile.mkdtemp(prefix="smart-metrics-")
        _created_metrics_dir.append(path)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        return
    os.makedirs(path, exist_ok=True)
    if server.master_pid:
        return
    # Only prometheus_client's files: the directory may be a mount point or shared.
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))


def child_exit(server: Any, worker: Any) -> None:
    # Imported here, not at the top: prometheus_client picks its multiprocess storage
    # at import time, which must come after on_starting has set the directory.
    from prometheus_client import multiprocess  # noqa: PLC0415

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    # After a USR2 re-exec the new master (reexec_pid) still uses the directory.
    if server.reexec_pid:
        return
    for path in _created_metrics_dir:
        shutil.rmtree(path, ignore_errors=True)
