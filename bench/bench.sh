#!/usr/bin/env bash
# `make bench`: installs what the benchmark needs (wrk from Debian's packages, the
# Python tools into .venv), raises the open-files limit, runs bench/run.py.
# BENCH_QUICK=1 runs a short version. Only 127.0.0.1 is ever targeted.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
stamp=.venv/.bench-installed

if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "wrk is missing: install it (apt-get install wrk) or run as root" >&2
    exit 1
  fi
  echo "installing wrk (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi

if [ ! -f "$stamp" ] || [ bench/requirements.txt -nt "$stamp" ]; then
  "$bin/python" -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
  touch "$stamp"
fi

# 10,000 client connections plus the upstream ones: wrk, each worker and the simulator
# need that many descriptors. The hard limit is as far as an unprivileged raise goes.
ulimit -n "$(ulimit -Hn)"

module=bench.run
if [ "${1:-}" = "--profile" ]; then
  shift
  module=bench.profile
elif [ "${1:-}" = "--https" ]; then
  shift
  module=bench.https
fi
# Bounded: the full plan takes about 9 minutes; past 12 the run is stopped.
exec timeout --signal=TERM --kill-after=30 720 "$bin/python" -m "$module" "$@"
