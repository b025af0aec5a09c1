"""What a node tells the master when it joins: the static facts about the Pi.

Read once per process (they do not change while it runs) from psutil,
``platform``, ``/proc/cpuinfo`` and ``/etc/os-release``, so the master can show
which board, OS and version every node runs without anyone logging in to it.
"""

from __future__ import annotations

import functools
import platform
import socket
from typing import Any, Optional

import psutil

import rpicluster


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as source:
            return source.read()
    except OSError:
        return ""


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    """The CPU or board model from ``/proc/cpuinfo`` (a Pi names its board in ``Model``)."""
    text = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "model", "hardware", "cpu model", "processor"):
        value = fields.get(key)
        if value and not value.isdigit():
            return value
    return platform.processor() or platform.machine() or "unknown"


def os_name(os_release: Optional[str] = None) -> str:
    """``PRETTY_NAME`` of ``/etc/os-release`` (e.g. "Debian GNU/Linux 12 (bookworm)")."""
    text = _read("/etc/os-release") if os_release is None else os_release
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"')
    return values.get("PRETTY_NAME") or values.get("NAME") or platform.system()


def cpu_freq() -> Optional[Any]:
    """psutil's CPU frequency, or None where the board's kernel has no cpufreq."""
    try:
        return psutil.cpu_freq()
    except (OSError, NotImplementedError, AttributeError):
        return None


def _cpu_freq_range() -> tuple[Optional[float], Optional[float]]:
    freq = cpu_freq()
    if freq is None:
        return None, None
    return (freq.min or None), (freq.max or None)


@functools.lru_cache(maxsize=1)
def node_details() -> dict[str, Any]:
    """The node's details as sent in ``hello`` (JSON-ready; cached for the process)."""
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    freq_min, freq_max = _cpu_freq_range()
    return {
        "hostname": socket.gethostname(),
        "ram_total": memory.total,
        "swap_total": swap.total,
        "cpu_model": cpu_model(),
        "cpu_cores": psutil.cpu_count(logical=True) or 1,
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_freq_min_mhz": freq_min,
        "cpu_freq_max_mhz": freq_max,
        "os": os_name(),
        "kernel": platform.release(),
        "architecture": platform.machine(),
        "python_version": platform.python_version(),
        "rpicluster_version": rpicluster.__version__,
        "psutil_version": psutil.__version__,
        "boot_time": psutil.boot_time(),
    }
