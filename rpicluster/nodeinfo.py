"""What a node tells the master when it joins: the static facts about the Pi.

Read once per process (they do not change while it runs) from psutil,
``platform``, ``/proc/cpuinfo``, the device tree and ``/etc/os-release``, so the
master can show which board, OS and version every node runs without anyone
logging in to it. What a machine lacks (no device tree on x86) is None.
"""

from __future__ import annotations

import functools
import platform
import socket
from typing import Any, Optional

import psutil

import rpicluster

# The board's name as the firmware hands it to the kernel (NUL-terminated, e.g.
# "Raspberry Pi 4 Model B Rev 1.4"); /proc/device-tree is a link to the second.
DEVICE_TREE_MODEL_PATHS = ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model")
# Longest string a detail may be (docs/protocol.md, member-data limits).
DETAIL_STRING_MAX = 256


def _bounded(text: Optional[str]) -> Optional[str]:
    return None if text is None else text[:DETAIL_STRING_MAX]


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


def board_model(paths: tuple[str, ...] = DEVICE_TREE_MODEL_PATHS) -> Optional[str]:
    """The device tree's model string without its trailing NUL, or None (no device tree)."""
    for path in paths:
        try:
            with open(path, "rb") as source:
                raw = source.read(4 * DETAIL_STRING_MAX)
        except OSError:
            continue
        text = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()
        if text:
            return _bounded(text)
    return None


def _os_release(os_release: Optional[str]) -> dict[str, str]:
    text = _read("/etc/os-release") if os_release is None else os_release
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def os_name(os_release: Optional[str] = None) -> str:
    """``PRETTY_NAME`` of ``/etc/os-release`` (e.g. "Debian GNU/Linux 12 (bookworm)")."""
    values = _os_release(os_release)
    return values.get("PRETTY_NAME") or values.get("NAME") or platform.system()


def os_codename(os_release: Optional[str] = None) -> Optional[str]:
    """``VERSION_CODENAME`` of ``/etc/os-release`` ("bookworm", "trixie"), or None.

    The short name tells Raspberry Pi OS generations apart at a glance (trixie
    ships Python 3.13, bookworm 3.11).
    """
    return _bounded(_os_release(os_release).get("VERSION_CODENAME") or None)


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
        "cpu_model": _bounded(cpu_model()),
        "cpu_cores": psutil.cpu_count(logical=True) or 1,
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_freq_min_mhz": freq_min,
        "cpu_freq_max_mhz": freq_max,
        "model": board_model(),
        "os": _bounded(os_name()),
        "os_codename": os_codename(),
        "kernel": platform.release(),
        "architecture": platform.machine(),
        "python_version": platform.python_version(),
        "rpicluster_version": rpicluster.__version__,
        "psutil_version": psutil.__version__,
        "boot_time": psutil.boot_time(),
    }
