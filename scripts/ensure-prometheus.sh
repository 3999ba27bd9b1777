#!/usr/bin/env bash
# Makes `promtool` and `prometheus` available: the alert-rule tests and the end-to-end
# metrics test need them. Idempotent: does nothing when both are already on PATH.
# Installs Debian's `prometheus` package when run as root on a system with apt-get;
# otherwise prints how to install it and exits 1.
set -euo pipefail

have_both() { command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; }

if have_both; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    cat >&2 <<'HOW'
promtool and prometheus are not on PATH. Install them with
    sudo apt-get install -y --no-install-recommends prometheus    (Debian, Ubuntu)
or put both binaries of a release from https://prometheus.io/download/ on PATH.
HOW
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
apt-get update -qq
# No recommends: the node exporter it suggests is not needed to check rules.
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package's own server is not wanted: the tests start theirs on a free port.
if [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

if ! have_both; then
    echo "the prometheus package did not provide promtool and prometheus on PATH" >&2
    exit 1
fi
echo "installed: $(promtool --version 2>&1 | head -n 1)"
