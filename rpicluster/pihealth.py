"""What a Pi's power and heat signals mean: one decoding for every place that shows them.

A Pi cluster's classic failures are a shared USB supply that sags (under-voltage)
and heat (the firmware caps the clock, then throttles). The firmware reports both
in one 32-bit word, the one ``vcgencmd get_throttled`` prints and that Raspberry
Pi OS kernels expose in sysfs as ``get_throttled``; the low bits say what is
happening *now*, bits 16-19 what has happened *since boot*. The ``rpi_volt`` hwmon
device of a Pi 4/5 adds an under-voltage alarm of its own.

The ``vitals`` role sends the raw readings (``throttled``, ``under_voltage_alarm``);
the status table, the dashboard, the JSON API and ``/metrics`` all decode them
here, so a badge and a metric can never disagree about a bit. Bit layout: the
Raspberry Pi documentation of ``vcgencmd get_throttled``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional


class Condition(NamedTuple):
    """One condition of the firmware's throttling word."""

    key: str  # stable machine name: JSON API field and the `condition` label of /metrics
    label: str  # what a person reads on a badge
    now_bit: int  # mask of the bit set while the condition holds
    since_boot_bit: int  # mask of the bit set once it has happened since boot


CONDITIONS: tuple[Condition, ...] = (
    Condition("under_voltage", "under-voltage", 0x1, 0x10000),
    Condition("frequency_capped", "frequency capped", 0x2, 0x20000),
    Condition("throttled", "throttled", 0x4, 0x40000),
    Condition("soft_temperature_limit", "soft temperature limit", 0x8, 0x80000),
)

THROTTLED_MAX = 0xFFFFFFFF  # the word is 32 bits


def _word(value: Any) -> Optional[int]:
    """The throttling word as an int, or None when absent or not a plausible word."""
    if type(value) is not int or not 0 <= value <= THROTTLED_MAX:
        return None
    return value


def conditions(vitals: Optional[dict[str, Any]]) -> dict[str, dict[str, bool]]:
    """``{key: {"now": bool, "since_boot": bool}}`` per condition; ``{}`` when unknown.

    ``under_voltage_alarm`` (hwmon, 1 = alarm) also sets ``under_voltage.now``:
    on a Pi 5 it may be the only under-voltage signal a hardened service can read.
    """
    vitals = vitals if isinstance(vitals, dict) else {}
    word = _word(vitals.get("throttled"))
    alarm = vitals.get("under_voltage_alarm")
    alarm = alarm == 1 and type(alarm) is int
    if word is None and not alarm:
        return {}
    word = word or 0
    result = {
        c.key: {"now": bool(word & c.now_bit), "since_boot": bool(word & c.since_boot_bit)}
        for c in CONDITIONS
    }
    if alarm:
        result["under_voltage"]["now"] = True
        result["under_voltage"]["since_boot"] = True
    return result


def warnings(vitals: Optional[dict[str, Any]]) -> list[str]:
    """Badge texts, worst first: "under-voltage now", then "throttled since boot", ...

    A condition that holds now is not repeated as "since boot".
    """
    found = conditions(vitals)
    now = [f"{c.label} now" for c in CONDITIONS if found.get(c.key, {}).get("now")]
    past = [
        f"{c.label} since boot"
        for c in CONDITIONS
        if found.get(c.key, {}).get("since_boot") and not found[c.key]["now"]
    ]
    return now + past
