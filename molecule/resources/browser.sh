#!/usr/bin/env bash
# Install Debian's headless Chromium and its WebDriver for the dashboard test
# (tests/test_dashboard_browser.py). Idempotent and fast: when both binaries are
# already there it does nothing. The test drives /usr/bin/chromedriver directly,
# so Selenium Manager never downloads a browser or a driver.
set -euo pipefail

have() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }

if have; then
    echo "browser.sh: chromium and chromedriver already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "browser.sh: chromium or chromium-driver is missing and installing them needs root" >&2
    echo "browser.sh: run as root, or: sudo apt-get install -y chromium chromium-driver" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are missing or a first install fails.
if ! apt-get install -y --no-install-recommends chromium chromium-driver; then
    apt-get update
    apt-get install -y --no-install-recommends chromium chromium-driver
fi

if ! have; then
    echo "browser.sh: installed chromium but /usr/bin/chromium or /usr/bin/chromedriver is missing" >&2
    exit 1
fi
echo "browser.sh: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
