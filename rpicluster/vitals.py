"""One reading of a node's vitals: the numbers that change while a Pi runs.

Cheap by design (a few reads under /proc and /sys, no subprocess, no sleep), so
the ``vitals`` role stays well under 0.5 % of one core even on a Pi Zero: every
file that may or may not exist (thermal zone, the Pi's throttling word and
under-voltage alarm, the cpufreq policy) is looked for once, when the reader is
made. CPU % and the network and disk rates are measured between two calls, as
``top`` does: the first reading of a process says 0.0 for the CPU and None for
the rates.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import psutil

from rpicluster import nodeinfo, pisensors
from rpicluster.rates import CounterRates, Counters, disk_counters, network_counters

THERMAL_DIR = "/sys/class/thermal"
# Zone types that measure the SoC/CPU, best first (Raspberry Pi: "cpu-thermal").
_CPU_ZONE_TYPES = ("cpu-thermal", "cpu_thermal", "soc_thermal", "x86_pkg_temp", "cpu", "soc")


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as source:
            return source.read().strip()
    except OSError:
        return None


def find_thermal_zone(thermal_dir: str = THERMAL_DIR) -> Optional[str]:
    """Path of the ``temp`` file of the CPU's thermal zone, or None if the board has none."""
    try:
        zones = sorted(name for name in os.listdir(thermal_dir) if name.startswith("thermal_zone"))
    except OSError:
        return None
    readable: list[tuple[int, str]] = []
    for zone in zones:
        temp = os.path.join(thermal_dir, zone, "temp")
        if _read_text(temp) is None:
            continue
        kind = (_read_text(os.path.join(thermal_dir, zone, "type")) or "").lower()
        rank = next(
            (i for i, name in enumerate(_CPU_ZONE_TYPES) if name in kind), len(_CPU_ZONE_TYPES)
        )
        readable.append((rank, temp))
    return min(readable)[1] if readable else None


def read_temperature(temp_path: Optional[str]) -> Optional[float]:
    """Degrees Celsius from a thermal zone's ``temp`` file (millidegrees), or None."""
    if temp_path is None:
        return None
    text = _read_text(temp_path)
    try:
        return round(int(text) / 1000.0, 1) if text else None
    except ValueError:
        return None


class VitalsReader:
    """Takes readings; keeps what it found once (the sensor files, the disk path).

    The directories and counter sources are parameters so that tests can hand
    it a sysfs tree built in a temporary directory and counters with a clock.
    """

    MIN_CPU_WINDOW = 0.2

    def __init__(
        self,
        disk_path: str = "/",
        thermal_dir: str = THERMAL_DIR,
        *,
        platform_dir: str = pisensors.PLATFORM_DIR,
        hwmon_dir: str = pisensors.HWMON_DIR,
        cpu_dir: str = pisensors.CPU_DIR,
        net_counters: Callable[[], Optional[Counters]] = network_counters,
        io_counters: Callable[[], Optional[Counters]] = disk_counters,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.disk_path = disk_path
        self.temp_path = find_thermal_zone(thermal_dir)
        self.pi = pisensors.PiSensors(platform_dir, hwmon_dir, cpu_dir)
        self.net_rates = CounterRates(net_counters, 2, clock)
        self.disk_rates = CounterRates(io_counters, 2, clock)
        psutil.cpu_percent(interval=None)  # start the CPU % window
        self._cpu_window_start: Optional[float] = time.monotonic()

    def cpu_percent(self) -> float:
        """System-wide CPU % since the previous reading.

        The first window (reader created, then read right after joining) lasts a
        few milliseconds and says 0 % or 100 % by chance; it is stretched to
        MIN_CPU_WINDOW seconds, once.
        """
        short = 0.0
        if self._cpu_window_start is not None:
            short = self.MIN_CPU_WINDOW - (time.monotonic() - self._cpu_window_start)
            self._cpu_window_start = None
        return psutil.cpu_percent(interval=short if short > 0 else None)

    def read(self) -> dict[str, Any]:
        """One reading: numbers, None where the board lacks a sensor (README, "Vitals")."""
        memory = psutil.virtual_memory()
        swap = psutil.swap_memory()
        try:
            disk = psutil.disk_usage(self.disk_path)
            disk_free, disk_total = disk.free, disk.total
        except OSError:
            disk_free = disk_total = None
        cpu_freq = self.pi.cpu_freq_mhz()
        if cpu_freq is None:
            freq = nodeinfo.cpu_freq()
            cpu_freq = round(freq.current, 1) if freq else None
        net_rx, net_tx = self.net_rates.rates()
        disk_read, disk_write = self.disk_rates.rates()
        load1, load5, load15 = os.getloadavg()
        now = time.time()
        return {
            "ts": now,
            "cpu_percent": self.cpu_percent(),
            "cpu_freq_mhz": cpu_freq,
            "load_1": round(load1, 2),
            "load_5": round(load5, 2),
            "load_15": round(load15, 2),
            "ram_available": memory.available,
            "ram_total": memory.total,
            "swap_free": swap.free,
            "disk_free": disk_free,
            "disk_total": disk_total,
            "uptime": round(now - psutil.boot_time(), 1),
            "temperature": read_temperature(self.temp_path),
            "throttled": self.pi.throttled(),
            "under_voltage_alarm": self.pi.under_voltage_alarm(),
            "net_rx_bytes_per_s": net_rx,
            "net_tx_bytes_per_s": net_tx,
            "disk_read_bytes_per_s": disk_read,
            "disk_write_bytes_per_s": disk_write,
        }
