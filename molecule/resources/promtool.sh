#!/usr/bin/env bash
# Install Debian's `prometheus` package for its `promtool`, which
# tests/test_web_metrics.py uses to check the /metrics exposition
# (`promtool check metrics`: names, units, _total suffixes, help texts).
# Idempotent and fast: when promtool is already there it does nothing. The test
# fails (never skips) without promtool, so a fresh CI machine must run this first;
# `make pytest` does.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    echo "promtool.sh: $(command -v promtool) already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "promtool.sh: promtool is missing and installing Debian's prometheus package needs root" >&2
    echo "promtool.sh: run as root, or: sudo apt-get install -y --no-install-recommends prometheus" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Only the binaries are needed: the package's service is not started in a
# container without systemd, and is masked where systemd runs.
if ! apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends prometheus; then
    apt-get -o DPkg::Lock::Timeout=600 update
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends prometheus
fi

if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool.sh: installed prometheus but promtool is not on PATH" >&2
    exit 1
fi
echo "promtool.sh: installed $(promtool --version 2>&1 | head -n 1)"
