"""Where a Raspberry Pi's own power and clock signals live in sysfs: found once, read cheaply.

A Pi cluster's classic failures are a sagging shared USB supply and heat. The
firmware reports both; a Raspberry Pi OS kernel exposes them as plain files, so
the ``vitals`` role reads them every few seconds without running a program:

- ``get_throttled``: the firmware's 32-bit throttling word (the one
  ``vcgencmd get_throttled`` prints), an attribute of the firmware device that
  drivers/firmware/raspberrypi.c in the Raspberry Pi kernel adds
  (``sprintf(buf, "%x\\n", value)``: lowercase hex without ``0x``). Its directory
  differs by model and kernel (``/sys/devices/platform/soc/soc:firmware`` on a Pi
  4, another ``soc@...`` node on a Pi 5), so it is searched for under
  ``/sys/devices/platform``, once. Newer kernels mark the file deprecated in
  favour of hwmon and log one warning per boot the first time it is read. The
  low 16 bits are live, the high 16 sticky; the firmware clears the sticky ones
  when asked to, and the kernel's hwmon driver asks at each of its 2 s polls, so
  with it loaded "since boot" can mean "in the last seconds" (raspberrypi/linux
  issue 2367 and PR 2397; drivers/hwmon/raspberrypi-hwmon.c).
- ``in0_lcrit_alarm`` of the hwmon device named ``rpi_volt``
  (drivers/hwmon/raspberrypi-hwmon.c, documented in the kernel's
  Documentation/hwmon/raspberrypi-hwmon.rst): 1 while the firmware reports
  under-voltage. hwmon numbering changes between boots, so it is found by name.
- ``scaling_cur_freq`` of the CPU's only cpufreq policy (kHz): cheaper than
  psutil, which also parses ``/proc/cpuinfo``; all cores of a Pi share one clock.

``vcgencmd`` is deliberately not used: it costs a process per reading and needs
``/dev/vcio``, which the hardened systemd unit (PrivateDevices=yes) hides anyway.
What a machine lacks (x86, containers, an older kernel) is None, never an error.
What the bits mean is rpicluster/pihealth.py's job.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Optional

from rpicluster.pihealth import THROTTLED_MAX

log = logging.getLogger(__name__)

PLATFORM_DIR = "/sys/devices/platform"
HWMON_DIR = "/sys/class/hwmon"
CPU_DIR = "/sys/devices/system/cpu"

THROTTLED_FILE = "get_throttled"
UNDER_VOLTAGE_HWMON = "rpi_volt"
UNDER_VOLTAGE_ALARM_FILE = "in0_lcrit_alarm"

# The firmware device sits one or two levels below /sys/devices/platform on every
# Pi kernel seen (soc/soc:firmware, soc:firmware); 3 levels leave room for a
# bus in between. The directory budget keeps the one-off search cheap on a board
# with a large device tree (a Pi 4's platform tree has a few hundred directories).
SEARCH_MAX_DEPTH = 3
SEARCH_MAX_DIRS = 2000


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as source:
            return source.read().strip()
    except OSError:
        return None


def find_throttled_file(
    platform_dir: str = PLATFORM_DIR,
    max_depth: int = SEARCH_MAX_DEPTH,
    max_dirs: int = SEARCH_MAX_DIRS,
) -> Optional[str]:
    """Path of the firmware's ``get_throttled`` file, or None where the kernel has none.

    Breadth first, at most ``max_depth`` directories deep and ``max_dirs``
    directories in all, never following symlinks (sysfs is full of loops), and
    only a file that reads as a throttling word counts.
    """
    queue: deque[tuple[str, int]] = deque([(platform_dir, 0)])
    visited = 0
    while queue and visited < max_dirs:
        directory, depth = queue.popleft()
        visited += 1
        try:
            with os.scandir(directory) as entries:
                children = sorted(entries, key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in children:
            if entry.name == THROTTLED_FILE and entry.is_file(follow_symlinks=False):
                if read_throttled(entry.path) is not None:
                    return entry.path
            elif depth < max_depth and entry.is_dir(follow_symlinks=False):
                queue.append((entry.path, depth + 1))
    return None


def read_throttled(path: Optional[str]) -> Optional[int]:
    """The throttling word from a ``get_throttled`` file (hex, with or without ``0x``)."""
    if path is None:
        return None
    text = _read_text(path)
    if not text:
        return None
    try:
        value = int(text, 16)
    except ValueError:
        return None
    return value if 0 <= value <= THROTTLED_MAX else None


def find_under_voltage_alarm(hwmon_dir: str = HWMON_DIR) -> Optional[str]:
    """Path of ``in0_lcrit_alarm`` of the ``rpi_volt`` hwmon device, or None."""
    try:
        devices = sorted(os.listdir(hwmon_dir))
    except OSError:
        return None
    for device in devices:
        base = os.path.join(hwmon_dir, device)
        if _read_text(os.path.join(base, "name")) != UNDER_VOLTAGE_HWMON:
            continue
        alarm = os.path.join(base, UNDER_VOLTAGE_ALARM_FILE)
        if read_alarm(alarm) is not None:
            return alarm
    return None


def read_alarm(path: Optional[str]) -> Optional[int]:
    """A hwmon alarm file as 0 or 1 (any non-zero value is an alarm), or None."""
    if path is None:
        return None
    text = _read_text(path)
    try:
        return (1 if int(text) else 0) if text else None
    except ValueError:
        return None


def find_cpu_freq_file(cpu_dir: str = CPU_DIR) -> Optional[str]:
    """``scaling_cur_freq`` of the only cpufreq policy, or None.

    None with several policies too (a big.LITTLE or x86 machine clocks cores
    apart): the caller then keeps psutil's average over all of them.
    """
    policy_dir = os.path.join(cpu_dir, "cpufreq")
    try:
        policies = [name for name in os.listdir(policy_dir) if name.startswith("policy")]
    except OSError:
        return None
    if len(policies) != 1:
        return None
    path = os.path.join(policy_dir, policies[0], "scaling_cur_freq")
    return path if read_cpu_freq_mhz(path) is not None else None


def read_cpu_freq_mhz(path: Optional[str]) -> Optional[float]:
    """MHz from a cpufreq ``scaling_cur_freq`` file (kHz), or None."""
    if path is None:
        return None
    text = _read_text(path)
    try:
        khz = int(text) if text else None
    except ValueError:
        return None
    return round(khz / 1000.0, 1) if khz is not None and khz > 0 else None


class PiSensors:
    """The Pi's signal files, found once at start; each reading is a few small reads."""

    def __init__(
        self,
        platform_dir: str = PLATFORM_DIR,
        hwmon_dir: str = HWMON_DIR,
        cpu_dir: str = CPU_DIR,
    ) -> None:
        self.throttled_path = find_throttled_file(platform_dir)
        self.alarm_path = find_under_voltage_alarm(hwmon_dir)
        self.cpu_freq_path = find_cpu_freq_file(cpu_dir)
        log.debug(
            "pi sensors: throttled %s, under-voltage alarm %s, cpu frequency %s",
            self.throttled_path or "absent",
            self.alarm_path or "absent",
            self.cpu_freq_path or "psutil",
        )

    def throttled(self) -> Optional[int]:
        """The firmware's throttling word, None where the kernel does not expose it."""
        return read_throttled(self.throttled_path)

    def under_voltage_alarm(self) -> Optional[int]:
        """The ``rpi_volt`` hwmon alarm (0/1), None where there is no such device."""
        return read_alarm(self.alarm_path)

    def cpu_freq_mhz(self) -> Optional[float]:
        """Current CPU clock from sysfs; None when it must come from elsewhere."""
        return read_cpu_freq_mhz(self.cpu_freq_path)
