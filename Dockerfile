# Image of smart: gunicorn + gevent workers serving /api/smart on port 8080.
# tests/e2e/test_container.py runs this file's COPY/ENV/CMD/HEALTHCHECK without a Docker
# engine, so keep those instructions in their plain forms (exec-form CMD, KEY=VALUE ENV).

# A Debian release in the tag keeps rebuilds on the same distribution.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies before the code: editing smart/ does not reinstall them. Every pinned
# requirement ships a manylinux wheel (glibc <= 2.28, x86_64 and aarch64), so the slim
# image needs no compiler.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# A numeric uid lets Kubernetes' runAsNonRoot verify the user without /etc/passwd.
# The metrics dir is the only path the service writes besides /tmp and /dev/shm.
RUN groupadd --system --gid 10001 smart \
    && useradd --system --uid 10001 --gid smart --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin smart \
    && install -d -o smart -g smart -m 0700 /tmp/smart-metrics

# Code stays owned by root: the service user can read it but not change it.
COPY gunicorn.conf.py ./
COPY smart/ ./smart/
# The simulated upstream, for docker-compose's demo stack; the service never imports it.
COPY simulator/ ./simulator/
# Bytecode compiled once here, since PYTHONDONTWRITEBYTECODE (and a read-only root
# filesystem) stop every worker from caching it at run time.
RUN python -m compileall -q smart simulator

# gunicorn.conf.py reads these; PROMETHEUS_MULTIPROC_DIR is wiped and recreated there
# at start, so every start begins with empty counters.
ENV SMART_BIND=0.0.0.0:8080 \
    SMART_WORKER_TMP_DIR=/dev/shm \
    PROMETHEUS_MULTIPROC_DIR=/tmp/smart-metrics
# WEB_CONCURRENCY is left to the deployment: os.cpu_count() sees the host's cores, not
# the container's CPU limit, so set it to that limit (one gevent worker per core).

USER 10001:10001
EXPOSE 8080

# Liveness only (never touches the upstream); urllib because the slim image has no curl.
# The port follows SMART_BIND so an overridden bind is still checked.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('SMART_BIND', ':8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

# Exec form: gunicorn is PID 1 and receives docker's SIGTERM itself, which starts its
# graceful shutdown (SMART_GRACEFUL_TIMEOUT_S). The control socket is disabled in
# gunicorn.conf.py (control_socket_disable = True).
CMD ["gunicorn", "-c", "gunicorn.conf.py"]
