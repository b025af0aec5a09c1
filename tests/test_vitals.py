"""Node details and vitals readings: real psutil on this machine, fake sysfs trees."""

from __future__ import annotations

import json
import socket
import time

import psutil
import pytest

from rpicluster import nodeinfo
from rpicluster.vitals import VitalsReader, find_thermal_zone, read_temperature

PI_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
Hardware\t: BCM2835
Revision\t: c03111
Model\t\t: Raspberry Pi 4 Model B Rev 1.1
"""

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model\t\t: 85
model name\t: Intel(R) Xeon(R) Processor @ 2.50GHz
"""

OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nID=debian\n'


def test_cpu_model_names_the_pi_board():
    assert nodeinfo.cpu_model(PI_CPUINFO) == "Raspberry Pi 4 Model B Rev 1.1"


def test_cpu_model_on_x86_skips_the_numeric_model_field():
    assert nodeinfo.cpu_model(X86_CPUINFO) == "Intel(R) Xeon(R) Processor @ 2.50GHz"


def test_os_name_reads_pretty_name():
    assert nodeinfo.os_name(OS_RELEASE) == "Debian GNU/Linux 12 (bookworm)"
    assert nodeinfo.os_name("NAME=Alpine\n") == "Alpine"


def test_node_details_are_json_and_true_for_this_machine():
    details = nodeinfo.node_details()
    json.dumps(details)  # goes into the hello frame
    assert details["hostname"] == socket.gethostname()
    assert details["ram_total"] == psutil.virtual_memory().total
    assert details["cpu_cores"] == psutil.cpu_count()
    for key in ("cpu_model", "os", "kernel", "architecture", "python_version", "psutil_version"):
        assert isinstance(details[key], str) and details[key], key
    assert "cpu_freq_min_mhz" in details and "cpu_freq_max_mhz" in details


def make_zone(root, index: int, kind: str, millidegrees) -> None:
    zone = root / f"thermal_zone{index}"
    zone.mkdir()
    (zone / "type").write_text(kind + "\n")
    if millidegrees is not None:
        (zone / "temp").write_text(f"{millidegrees}\n")


def test_thermal_zone_prefers_the_cpu(tmp_path):
    make_zone(tmp_path, 0, "acpitz", 30000)
    make_zone(tmp_path, 1, "cpu-thermal", 51234)
    zone = find_thermal_zone(str(tmp_path))
    assert zone == str(tmp_path / "thermal_zone1" / "temp")
    assert read_temperature(zone) == 51.2


def test_thermal_zone_absent_or_unreadable_gives_none(tmp_path):
    assert find_thermal_zone(str(tmp_path / "missing")) is None
    make_zone(tmp_path, 0, "cpu-thermal", None)  # no temp file
    assert find_thermal_zone(str(tmp_path)) is None
    assert read_temperature(None) is None
    garbage = tmp_path / "garbage"
    garbage.write_text("hot\n")
    assert read_temperature(str(garbage)) is None


def test_a_reading_holds_every_vital_as_a_number(tmp_path):
    make_zone(tmp_path, 0, "cpu-thermal", 47000)
    reader = VitalsReader(thermal_dir=str(tmp_path))
    before = time.time()
    reading = reader.read()
    json.dumps(reading, allow_nan=False)
    assert before <= reading["ts"] <= time.time()
    assert reading["temperature"] == 47.0
    for key in ("cpu_percent", "load_1", "load_5", "load_15", "ram_available", "swap_free"):
        assert isinstance(reading[key], (int, float)), key
    assert 0 <= reading["cpu_percent"] <= 100
    assert 0 < reading["ram_available"] <= reading["ram_total"]
    assert 0 < reading["disk_free"] <= reading["disk_total"]
    assert reading["uptime"] > 0


def test_a_reading_is_cheap():
    reader = VitalsReader()
    # This thread's CPU only: other tests' threads and a loaded machine do not count.
    started = time.thread_time()
    for _ in range(200):
        reader.read()
    per_reading = (time.thread_time() - started) / 200
    # ~0.5 ms here. The bound only catches a reading gone pathological (a blocking
    # or busy sampler); the budget itself (0.5 % of a core for the whole slave) is
    # measured by bench/slave_footprint.py with figures in bench/results.md.
    assert per_reading < 0.05, f"{per_reading * 1000:.2f} ms of CPU per reading"


@pytest.mark.parametrize("path", ["/", "/nonexistent-disk"])
def test_disk_path_that_does_not_exist_gives_none(path):
    reading = VitalsReader(disk_path=path).read()
    if path == "/":
        assert reading["disk_free"] > 0
    else:
        assert reading["disk_free"] is None and reading["disk_total"] is None


def test_only_the_first_cpu_window_is_stretched(monkeypatch):
    """Read right after joining, a window of milliseconds would say 0 % or 100 % by chance."""
    windows: list = []
    real = psutil.cpu_percent

    def recording(interval=None):
        windows.append(interval)
        return real(interval=interval)

    monkeypatch.setattr(psutil, "cpu_percent", recording)
    reader = VitalsReader()
    reader.read()
    reader.read()
    assert windows[0] is None  # starts the window
    assert 0.1 < windows[1] <= VitalsReader.MIN_CPU_WINDOW
    assert windows[2] is None  # later readings span the time since the previous one
