"""The firmware's throttling word and the hwmon alarm, decoded once for every view."""

from __future__ import annotations

import pytest

from rpicluster import pihealth


def test_the_documented_example_word_decodes_to_its_bits():
    # 0x50005: under-voltage and throttled now, both also since boot.
    found = pihealth.conditions({"throttled": 0x50005})
    assert found["under_voltage"] == {"now": True, "since_boot": True}
    assert found["throttled"] == {"now": True, "since_boot": True}
    assert found["frequency_capped"] == {"now": False, "since_boot": False}
    assert found["soft_temperature_limit"] == {"now": False, "since_boot": False}
    assert pihealth.warnings({"throttled": 0x50005}) == ["under-voltage now", "throttled now"]


def test_since_boot_only_is_worded_as_the_past():
    assert pihealth.warnings({"throttled": 0x80000 | 0x20000}) == [
        "frequency capped since boot",
        "soft temperature limit since boot",
    ]


def test_a_healthy_pi_has_no_warnings_but_known_conditions():
    assert pihealth.warnings({"throttled": 0}) == []
    assert set(pihealth.conditions({"throttled": 0})) == {c.key for c in pihealth.CONDITIONS}


def test_the_hwmon_alarm_alone_means_under_voltage_now():
    assert pihealth.warnings({"throttled": None, "under_voltage_alarm": 1}) == ["under-voltage now"]
    assert pihealth.conditions({"under_voltage_alarm": 0}) == {}


@pytest.mark.parametrize(
    "vitals",
    [
        None,
        {},
        {"throttled": None},
        {"throttled": -1},
        {"throttled": 1 << 32},
        {"throttled": True},
        {"throttled": 1.0},
        {"throttled": "0x5"},
        "not a dict",
    ],
)
def test_absent_or_implausible_readings_are_unknown_not_errors(vitals):
    assert pihealth.conditions(vitals) == {}
    assert pihealth.warnings(vitals) == []
