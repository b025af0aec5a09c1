"""Backoff at its edges: the defaults, base == cap, and the exponent's clamp."""

from __future__ import annotations

import random

import pytest

from rpicluster.backoff import Backoff


def test_the_defaults_are_one_second_doubling_up_to_five():
    backoff = Backoff(rng=random.Random(3))
    ceilings = []
    for _ in range(5):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_without_an_rng_the_delays_come_from_a_private_generator():
    backoff = Backoff(0.5, 2.0)
    delays = [backoff.next_delay() for _ in range(20)]
    assert all(0.0 <= delay <= 2.0 for delay in delays)
    assert len(set(delays)) > 1


def test_a_cap_equal_to_the_base_is_a_fixed_window():
    backoff = Backoff(2.0, 2.0, rng=random.Random(5))
    for _ in range(4):
        assert backoff.ceiling() == 2.0
        assert 0.0 <= backoff.next_delay() <= 2.0


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.999)])
def test_a_base_not_above_zero_or_above_the_cap_is_refused(base, cap):
    with pytest.raises(ValueError, match="0 < base <= cap"):
        Backoff(base, cap)


def test_the_ceiling_stops_doubling_after_32_attempts():
    """The exponent is clamped so that a slave retrying for days never overflows a float."""
    backoff = Backoff(1.0, float(2**40), rng=random.Random(1))
    backoff.attempt = 32
    assert backoff.ceiling() == float(2**32)
    backoff.attempt = 10_000
    assert backoff.ceiling() == float(2**32)
