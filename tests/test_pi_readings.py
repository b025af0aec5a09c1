"""The Pi's own health signals, read from sysfs trees built from the documented layouts.

Layouts: the Raspberry Pi kernel's drivers/firmware/raspberrypi.c prints the
firmware's throttling word as ``"%x\\n"`` into ``get_throttled`` of the firmware
device; drivers/hwmon/raspberrypi-hwmon.c registers the hwmon device ``rpi_volt``
with ``in0_lcrit_alarm``; the device tree's ``model`` ends in a NUL; cpufreq's
``scaling_cur_freq`` is in kHz. Rates are computed from injected counters and an
injected clock: no sleeps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import pytest

from rpicluster import nodeinfo, pihealth, pisensors
from rpicluster.rates import CounterRates, disk_counters, network_counters
from rpicluster.vitals import VitalsReader

PI_KEYS = (
    "throttled",
    "under_voltage_alarm",
    "net_rx_bytes_per_s",
    "net_tx_bytes_per_s",
    "disk_read_bytes_per_s",
    "disk_write_bytes_per_s",
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def pi4_sys(root: Path, throttled: str = "50005\n", alarm: str = "1\n") -> Path:
    """A fake /sys of a Pi 4 under power trouble (0x50005: under-voltage and throttled now)."""
    write(root / "devices/platform/soc/soc:firmware/get_throttled", throttled)
    write(root / "devices/platform/soc/fe215040.serial/uevent", "DRIVER=pl011\n")
    write(root / "class/hwmon/hwmon0/name", "cpu_thermal\n")
    write(root / "class/hwmon/hwmon0/temp1_input", "48000\n")
    write(root / "class/hwmon/hwmon1/name", "rpi_volt\n")
    write(root / "class/hwmon/hwmon1/in0_lcrit_alarm", alarm)
    write(root / "devices/system/cpu/cpufreq/policy0/scaling_cur_freq", "1500000\n")
    write(root / "class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(root / "class/thermal/thermal_zone0/temp", "48312\n")
    return root


def reader_for(root: Path, **kwargs) -> VitalsReader:
    return VitalsReader(
        thermal_dir=str(root / "class/thermal"),
        platform_dir=str(root / "devices/platform"),
        hwmon_dir=str(root / "class/hwmon"),
        cpu_dir=str(root / "devices/system/cpu"),
        **kwargs,
    )


# --- the firmware's throttling word ---------------------------------------------------


def test_throttled_word_is_found_under_platform_and_decodes_with_pihealth(tmp_path):
    root = pi4_sys(tmp_path)
    path = pisensors.find_throttled_file(str(root / "devices/platform"))
    assert path == str(root / "devices/platform/soc/soc:firmware/get_throttled")
    word = pisensors.read_throttled(path)
    assert word == 0x50005
    assert pihealth.warnings({"throttled": word}) == [
        "under-voltage now",
        "throttled now",
    ]
    assert pihealth.conditions({"throttled": word})["under_voltage"] == {
        "now": True,
        "since_boot": True,
    }


def test_throttled_file_is_found_wherever_the_firmware_node_sits(tmp_path):
    """A Pi 5's firmware node is not soc/soc:firmware: search, do not hard-code."""
    platform = tmp_path / "platform"
    write(platform / "soc@107c000000/soc@107c000000:firmware/get_throttled", "80008\n")
    path = pisensors.find_throttled_file(str(platform))
    assert path is not None and path.endswith("soc@107c000000:firmware/get_throttled")
    assert pisensors.read_throttled(path) == 0x80008
    assert pihealth.warnings({"throttled": 0x80008}) == ["soft temperature limit now"]


def test_throttled_search_is_bounded_and_does_not_follow_symlinks(tmp_path):
    platform = tmp_path / "platform"
    (platform / "a").mkdir(parents=True)
    os.symlink(platform, platform / "a" / "loop")  # sysfs is full of these
    write(platform / "a/b/c/d/get_throttled", "5\n")  # 4 levels deep: beyond the search
    assert pisensors.find_throttled_file(str(platform)) is None
    assert pisensors.find_throttled_file(str(platform), max_depth=4) is not None
    assert pisensors.find_throttled_file(str(platform), max_depth=4, max_dirs=2) is None


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("0\n", 0),
        ("50000\n", 0x50000),
        ("0x50005\n", 0x50005),  # vcgencmd's spelling, should a kernel ever print it
        ("ffffffff\n", 0xFFFFFFFF),
        ("100000000\n", None),  # more than 32 bits: not a throttling word
        ("\n", None),
        ("hot\n", None),
        ("-1\n", None),
    ],
)
def test_throttled_word_parsing(tmp_path, text, word):
    assert pisensors.read_throttled(str(write(tmp_path / "get_throttled", text))) == word


def test_an_unreadable_get_throttled_is_not_taken(tmp_path):
    platform = tmp_path / "platform"
    write(platform / "soc/soc:firmware/get_throttled", "garbage\n")
    assert pisensors.find_throttled_file(str(platform)) is None
    assert pisensors.read_throttled(None) is None
    assert pisensors.read_throttled(str(tmp_path / "missing")) is None


# --- the rpi_volt hwmon alarm ---------------------------------------------------------


def test_under_voltage_alarm_is_found_by_name_not_by_number(tmp_path):
    root = pi4_sys(tmp_path)
    path = pisensors.find_under_voltage_alarm(str(root / "class/hwmon"))
    assert path == str(root / "class/hwmon/hwmon1/in0_lcrit_alarm")
    assert pisensors.read_alarm(path) == 1
    write(root / "class/hwmon/hwmon1/in0_lcrit_alarm", "0\n")
    assert pisensors.read_alarm(path) == 0
    # the alarm alone (a Pi without the sysfs word) still says under-voltage now
    assert pihealth.warnings({"throttled": None, "under_voltage_alarm": 1}) == ["under-voltage now"]


def test_no_rpi_volt_device_means_no_alarm(tmp_path):
    hwmon = tmp_path / "hwmon"
    write(hwmon / "hwmon0/name", "coretemp\n")
    write(hwmon / "hwmon0/in0_lcrit_alarm", "1\n")  # an alarm, but not the Pi's
    write(hwmon / "hwmon1/name", "rpi_volt\n")  # the Pi's device without the file
    assert pisensors.find_under_voltage_alarm(str(hwmon)) is None
    assert pisensors.find_under_voltage_alarm(str(tmp_path / "missing")) is None
    assert pisensors.read_alarm(None) is None
    assert pisensors.read_alarm(str(write(tmp_path / "bad", "x\n"))) is None


# --- CPU frequency --------------------------------------------------------------------


def test_cpu_frequency_comes_from_the_only_cpufreq_policy(tmp_path):
    root = pi4_sys(tmp_path)
    cpu = root / "devices/system/cpu"
    path = pisensors.find_cpu_freq_file(str(cpu))
    assert path == str(cpu / "cpufreq/policy0/scaling_cur_freq")
    assert pisensors.read_cpu_freq_mhz(path) == 1500.0
    write(cpu / "cpufreq/policy0/scaling_cur_freq", "600000\n")
    assert pisensors.read_cpu_freq_mhz(path) == 600.0


def test_several_policies_or_none_leave_cpu_frequency_to_psutil(tmp_path):
    cpu = tmp_path / "cpu"
    assert pisensors.find_cpu_freq_file(str(cpu)) is None
    write(cpu / "cpufreq/policy0/scaling_cur_freq", "1800000\n")
    write(cpu / "cpufreq/policy4/scaling_cur_freq", "2400000\n")
    assert pisensors.find_cpu_freq_file(str(cpu)) is None
    assert pisensors.read_cpu_freq_mhz(str(write(tmp_path / "f", "0\n"))) is None
    assert pisensors.read_cpu_freq_mhz(str(write(tmp_path / "g", "fast\n"))) is None


# --- the vitals reading with and without a Pi -----------------------------------------


def test_a_pi_reading_carries_the_power_and_clock_signals(tmp_path):
    reading = reader_for(pi4_sys(tmp_path)).read()
    json.dumps(reading, allow_nan=False)
    assert reading["throttled"] == 0x50005
    assert reading["under_voltage_alarm"] == 1
    assert reading["cpu_freq_mhz"] == 1500.0
    assert reading["temperature"] == 48.3
    assert pihealth.warnings(reading)[0] == "under-voltage now"


def test_a_machine_without_pi_sensors_reads_null_not_an_error(tmp_path):
    empty = tmp_path / "sys"
    empty.mkdir()
    reading = reader_for(empty).read()
    json.dumps(reading, allow_nan=False)
    for key in PI_KEYS:
        assert key in reading and reading[key] is None, key
    assert reading["temperature"] is None
    assert pihealth.warnings(reading) == []
    # the CPU frequency falls back to psutil (a number here, or None in a container)
    assert reading["cpu_freq_mhz"] is None or reading["cpu_freq_mhz"] > 0


def test_the_default_reader_on_this_machine_has_every_key():
    reader = VitalsReader()
    first, second = reader.read(), reader.read()
    for key in PI_KEYS:
        assert key in first and key in second, key
    for key in PI_KEYS[2:]:
        assert first[key] is None, key  # no earlier reading to compare with
        assert second[key] is None or second[key] >= 0, key


# --- rates between readings -----------------------------------------------------------


class Feed:
    """Counters and a clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.counters: Optional[dict[str, tuple[int, ...]]] = {}

    def clock(self) -> float:
        return self.now

    def read(self) -> Optional[dict[str, tuple[int, ...]]]:
        return None if self.counters is None else dict(self.counters)


def test_first_rate_is_none_then_bytes_per_second():
    feed = Feed()
    rates = CounterRates(feed.read, 2, feed.clock)
    feed.counters = {"eth0": (1_000, 500), "wlan0": (10, 0)}
    assert rates.rates() == (None, None)
    feed.now += 2.0
    feed.counters = {"eth0": (3_000, 1_500), "wlan0": (1_010, 0)}
    assert rates.rates() == (1_500.0, 500.0)
    feed.now += 5.0
    assert rates.rates() == (0.0, 0.0)


def test_a_counter_that_goes_back_counts_its_new_value():
    """A reset (interface re-created, or a 32-bit wrap psutil missed) is not negative."""
    feed = Feed()
    rates = CounterRates(feed.read, 2, feed.clock)
    feed.counters = {"eth0": (2**32 - 100, 4_000)}
    rates.rates()
    feed.now += 4.0
    feed.counters = {"eth0": (400, 4_400)}
    assert rates.rates() == (100.0, 100.0)


def test_interfaces_that_come_or_go_are_left_out_of_that_interval():
    feed = Feed()
    rates = CounterRates(feed.read, 2, feed.clock)
    feed.counters = {"eth0": (0, 0), "usb0": (9_000_000, 9_000_000)}
    rates.rates()
    feed.now += 1.0
    feed.counters = {"eth0": (10, 20), "wlan0": (5_000_000, 5_000_000)}
    assert rates.rates() == (10.0, 20.0)
    feed.now += 1.0
    feed.counters = {"eth0": (20, 40), "wlan0": (5_000_100, 5_000_000)}
    assert rates.rates() == (110.0, 20.0)


def test_unreadable_counters_give_none_and_start_afresh():
    feed = Feed()
    rates = CounterRates(feed.read, 2, feed.clock)
    feed.counters = {"disks": (0, 0)}
    rates.rates()
    feed.now += 1.0
    feed.counters = None
    assert rates.rates() == (None, None)
    feed.now += 1.0
    feed.counters = {"disks": (500, 500)}
    assert rates.rates() == (None, None)  # no baseline any more
    feed.now += 1.0
    feed.counters = {"disks": (1_000, 600)}
    assert rates.rates() == (500.0, 100.0)


def test_a_clock_that_did_not_move_gives_none():
    feed = Feed()
    rates = CounterRates(feed.read, 1, feed.clock)
    feed.counters = {"x": (0,)}
    rates.rates()
    feed.counters = {"x": (10,)}
    assert rates.rates() == (None,)
    feed.now += 0.5
    feed.counters = {"x": (15,)}
    assert rates.rates() == (10.0,)


def test_a_failing_counter_source_is_none_not_an_exception():
    def broken():
        raise OSError("/proc/net/dev: no such file")

    assert CounterRates(broken, 2).rates() == (None, None)


def test_vitals_rates_use_the_injected_counters_and_clock(tmp_path):
    net, disk = Feed(), Feed()
    net.counters = {"eth0": (0, 0)}
    disk.counters = {"disks": (0, 0)}
    reader = reader_for(
        pi4_sys(tmp_path), net_counters=net.read, io_counters=disk.read, clock=net.clock
    )
    first = reader.read()
    assert [first[key] for key in PI_KEYS[2:]] == [None, None, None, None]
    net.now += 5.0
    net.counters = {"eth0": (50_000, 5_000)}
    disk.counters = {"disks": (1_024_000, 512_000)}
    second = reader.read()
    assert second["net_rx_bytes_per_s"] == 10_000.0
    assert second["net_tx_bytes_per_s"] == 1_000.0
    assert second["disk_read_bytes_per_s"] == 204_800.0
    assert second["disk_write_bytes_per_s"] == 102_400.0


def test_real_counter_sources_leave_out_loopback_and_partitions():
    nics = network_counters()
    assert nics is not None and "lo" not in nics
    assert all(len(values) == 2 for values in nics.values())
    disks = disk_counters()
    assert disks is None or set(disks) == {"disks"}


# --- details at join: the board model and the OS codename ------------------------------


def test_board_model_drops_the_trailing_nul(tmp_path):
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    assert nodeinfo.board_model((str(tmp_path / "missing"), str(model))) == (
        "Raspberry Pi 4 Model B Rev 1.4"
    )


def test_board_model_is_none_without_a_device_tree_and_bounded_with_one(tmp_path):
    assert nodeinfo.board_model((str(tmp_path / "missing"),)) is None
    empty = tmp_path / "empty"
    empty.write_bytes(b"\x00")
    assert nodeinfo.board_model((str(empty),)) is None
    long = tmp_path / "long"
    long.write_bytes(b"P" * 2000 + b"\x00")
    assert nodeinfo.board_model((str(long),)) == "P" * nodeinfo.DETAIL_STRING_MAX


def test_os_codename_from_os_release():
    trixie = (
        'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nNAME="Debian GNU/Linux"\n'
        'VERSION_ID="13"\nVERSION="13 (trixie)"\nVERSION_CODENAME=trixie\nID=debian\n'
    )
    assert nodeinfo.os_codename(trixie) == "trixie"
    assert nodeinfo.os_name(trixie) == "Debian GNU/Linux 13 (trixie)"
    assert nodeinfo.os_codename("VERSION_CODENAME='bookworm'\n") == "bookworm"
    assert nodeinfo.os_codename('NAME="Alpine Linux"\n') is None
    assert nodeinfo.os_codename("VERSION_CODENAME=\n") is None


def test_node_details_carry_model_and_os_codename():
    details = nodeinfo.node_details()
    json.dumps(details)
    assert "model" in details and "os_codename" in details
    assert details["model"] == nodeinfo.board_model()
    assert details["os_codename"] == nodeinfo.os_codename()
    for key in ("os", "kernel", "python_version", "rpicluster_version"):
        assert isinstance(details[key], str) and details[key], key


# --- edges a reading must survive -----------------------------------------------------


@pytest.mark.parametrize(("text", "alarm"), [("0\n", 0), ("1\n", 1), ("2\n", 1), ("", None)])
def test_any_non_zero_hwmon_alarm_is_an_alarm(tmp_path, text, alarm):
    assert pisensors.read_alarm(str(write(tmp_path / "in0_lcrit_alarm", text))) == alarm


def test_an_unreadable_cpufreq_policy_is_not_taken(tmp_path):
    cpu = tmp_path / "cpu"
    write(cpu / "cpufreq/policy0/scaling_cur_freq", "\n")
    assert pisensors.find_cpu_freq_file(str(cpu)) is None
    assert pisensors.read_cpu_freq_mhz(None) is None
    assert pisensors.read_cpu_freq_mhz(str(write(tmp_path / "khz", "1234567\n"))) == 1234.6


def test_the_throttled_search_takes_the_shallowest_file_and_skips_directories(tmp_path):
    platform = tmp_path / "platform"
    (platform / "aaa/get_throttled").mkdir(parents=True)  # a directory of that name
    write(platform / "zzz/deeper/get_throttled", "4\n")
    write(platform / "mmm/get_throttled", "5\n")
    assert pisensors.find_throttled_file(str(platform)) == str(platform / "mmm/get_throttled")


def test_pi_sensors_found_once_keep_reading_the_same_files(tmp_path):
    root = pi4_sys(tmp_path)
    sensors = pisensors.PiSensors(
        str(root / "devices/platform"), str(root / "class/hwmon"), str(root / "devices/system/cpu")
    )
    assert (sensors.throttled(), sensors.under_voltage_alarm(), sensors.cpu_freq_mhz()) == (
        0x50005,
        1,
        1500.0,
    )
    write(root / "devices/platform/soc/soc:firmware/get_throttled", "50000\n")  # recovered
    write(root / "class/hwmon/hwmon1/in0_lcrit_alarm", "0\n")
    assert sensors.throttled() == 0x50000 and sensors.under_voltage_alarm() == 0
    assert pihealth.warnings({"throttled": 0x50000}) == [
        "under-voltage since boot",
        "throttled since boot",
    ]
    (root / "class/hwmon/hwmon1/in0_lcrit_alarm").unlink()  # the driver went away
    assert sensors.under_voltage_alarm() is None


def test_the_cpu_frequency_falls_back_to_psutil_when_sysfs_fails(tmp_path, monkeypatch):
    root = pi4_sys(tmp_path)
    reader = reader_for(root)
    write(root / "devices/system/cpu/cpufreq/policy0/scaling_cur_freq", "\n")
    monkeypatch.setattr(
        nodeinfo, "cpu_freq", lambda: type("F", (), {"current": 1199.96})(), raising=True
    )
    assert reader.read()["cpu_freq_mhz"] == 1200.0
    monkeypatch.setattr(nodeinfo, "cpu_freq", lambda: None)
    assert reader.read()["cpu_freq_mhz"] is None
