"""gunicorn settings for smart: plain Python, every knob overridable from the environment.

This file must not import smart, requests or anything that opens sockets: gunicorn's
gevent worker monkey-patches *after* reading it, in each worker, and no app is
preloaded so every worker builds its own session and pool after the fork.
"""

import os


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
if _env_int("SMART_MAX_IN_FLIGHT", 0) >= worker_connections:
    raise SystemExit("SMART_MAX_IN_FLIGHT must stay below SMART_WORKER_CONNECTIONS")
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
