#!/usr/bin/env bash
# `make run`: smart on 127.0.0.1:8080 (SMART_PORT) in the foreground, in front of the
# built-in simulated upstream on 127.0.0.1:8081 (SIMULATOR_PORT) - or in front of
# SMART_UPSTREAM_URL when it is set, without a simulator. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
port=${SMART_PORT:-8080}
sim_port=${SIMULATOR_PORT:-8081}
sim_pid=""

stop_simulator() {
  if [ -n "$sim_pid" ] && kill -0 "$sim_pid" 2>/dev/null; then
    kill -TERM "$sim_pid" 2>/dev/null || true
    wait "$sim_pid" 2>/dev/null || true
  fi
}
trap stop_simulator EXIT

if [ -z "${SMART_UPSTREAM_URL:-}" ]; then
  "$bin/python" -m simulator --host 127.0.0.1 --port "$sim_port" &
  sim_pid=$!
  export SMART_UPSTREAM_URL="http://127.0.0.1:${sim_port}/api/work"
  for _ in $(seq 100); do
    "$bin/python" - "$sim_port" <<'PY' && break
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.2).close()
except OSError:
    sys.exit(1)
PY
    kill -0 "$sim_pid" 2>/dev/null || { echo "the simulator failed to start" >&2; exit 1; }
    sleep 0.1
  done
fi

echo "smart: http://127.0.0.1:${port}/api/smart  ->  ${SMART_UPSTREAM_URL}" >&2
export GUNICORN_CMD_ARGS="--bind 127.0.0.1:${port} ${GUNICORN_CMD_ARGS:-}"
"$bin/gunicorn" -c gunicorn.conf.py
