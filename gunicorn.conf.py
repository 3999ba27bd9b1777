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
from typing import Any

# gunicorn's own logger base: part of the server, imports nothing of the app.
from gunicorn.glogging import Logger


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
# gunicorn's gevent worker (`-k gevent`), except that the errors gunicorn answers
# itself (414, 431, 400) are JSON like every other response. Resolved by name in the
# master; smart/worker.py imports nothing but gunicorn.
worker_class = "smart.worker.JsonErrorsGeventWorker"
# Open client connections one worker accepts: not set here. Each worker works it out
# at start from its descriptors, with the in-flight ceiling, or takes
# SMART_WORKER_CONNECTIONS (smart/capacity.py, smart/worker.py).
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
if loglevel not in ("debug", "info", "warning", "error", "critical"):
    raise SystemExit(f"SMART_LOG_LEVEL must be a logging level, got {loglevel!r}")


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be true or false, got {raw!r}")


# One line per HTTP request the application does not log itself: /api/smart requests
# have their own richer line in the request log (they set this environ key), every
# other path gets an access line. SMART_ACCESS_LOG=false silences it.
_access_log = _env_bool("SMART_ACCESS_LOG", True)
REQUEST_LOGGED = "smart.request_logged"  # smart.telemetry.REQUEST_LOGGED


#: Attributes every LogRecord has; anything else given as ``extra`` is a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonLogFormatter(logging.Formatter):
    """gunicorn's records as one JSON object per line: ts, level, logger, pid, msg and
    the extra fields. Defined here rather than imported: this file must not import smart.
    """

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            + f".{int(created % 1 * 1000):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class JsonAccessLogger(Logger):
    """gunicorn's logger with a lean access line of named fields.

    The stock ``access`` first renders every request header and environ variable into
    format atoms, about 140 us per request here; this one reads the few it logs.
    """

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if environ.get(REQUEST_LOGGED) or not self.access_log.isEnabledFor(logging.INFO):
            return
        status = str(resp.status).split(None, 1)[0]
        self.access_log.info(
            "access",
            extra={
                "remote_addr": environ.get("REMOTE_ADDR"),
                "method": environ.get("REQUEST_METHOD"),
                "path": environ.get("PATH_INFO"),
                "query": environ.get("QUERY_STRING") or None,
                "status": int(status) if status.isdigit() else status,
                "bytes": getattr(resp, "sent", None),
                "duration_ms": round(request_time.total_seconds() * 1000, 1),
                "request_id": _header(resp.headers, "x-request-id"),
                "user_agent": _header(getattr(req, "headers", req), "user-agent"),
            },
        )


def _header(headers: Any, name: str) -> str | None:
    for key, value in headers.items() if hasattr(headers, "items") else headers:
        if key.lower() == name:
            return str(value)
    return None


logger_class = JsonAccessLogger
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
