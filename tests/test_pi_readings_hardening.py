"""The hardened slave unit must leave the Pi's health readings visible to the service.

systemd.exec(5): ProtectKernelTunables= makes /sys and /proc/sys read-only (not
invisible); PrivateDevices= replaces /dev only; ProtectProc=invisible hides other
users' processes only. What would hide the readings: ProcSubset=pid (/proc/net/dev,
/proc/diskstats, /proc/device-tree), PrivateNetwork= (only loopback in /proc/net/dev),
or InaccessiblePaths=/TemporaryFileSystem= over /sys or /proc.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
READ_PATHS = ("/sys", "/proc")


def hiding(setting: str) -> bool:
    key, _, value = setting.partition("=")
    key, value = key.strip(), value.strip()
    if key == "ProcSubset":
        return value == "pid"
    if key == "PrivateNetwork":
        return value.lower() in ("yes", "true", "1", "on")
    if key in ("InaccessiblePaths", "TemporaryFileSystem"):
        paths = [word.lstrip("-+").split(":")[0] for word in value.split()]
        return (
            any(
                path == read
                or path.startswith(read + "/")
                or read.startswith(path.rstrip("/") + "/")
                for path in paths
                for read in READ_PATHS
            )
            or "/" in paths
        )
    return False


def test_default_hardening_hides_none_of_the_readings():
    defaults = yaml.safe_load((ROOT / "roles/rpicluster_common/defaults/main.yml").read_text())
    settings = defaults["rpicluster_systemd_hardening"]
    assert settings, "the slave unit is hardened"
    assert [s for s in settings if hiding(s)] == []


def test_the_slave_unit_template_adds_nothing_that_hides_them():
    template = (ROOT / "roles/rpicluster_slave/templates/rpicluster-slave.service.j2").read_text()
    lines = [line.strip() for line in template.splitlines() if "=" in line]
    assert [line for line in lines if hiding(line)] == []


def test_the_check_itself_recognises_what_would_hide_them():
    assert hiding("ProcSubset=pid")
    assert hiding("PrivateNetwork=yes")
    assert hiding("InaccessiblePaths=-/sys/class/hwmon")
    assert hiding("TemporaryFileSystem=/proc:ro")
    assert not hiding("ProtectKernelTunables=yes")
    assert not hiding("PrivateDevices=yes")
    assert not hiding("InaccessiblePaths=/home")
