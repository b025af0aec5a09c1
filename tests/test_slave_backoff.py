"""Reconnect backoff: full jitter under an exponentially growing, capped ceiling."""

from __future__ import annotations

import random
import statistics

import pytest

from rpicluster.backoff import Backoff


def test_ceilings_double_from_base_up_to_the_cap():
    backoff = Backoff(0.5, 5.0, rng=random.Random(1))
    ceilings = []
    for _ in range(8):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]


def test_first_retry_comes_within_a_second_with_the_defaults():
    delays = [Backoff(rng=random.Random(seed)).next_delay() for seed in range(1000)]
    assert max(delays) <= 1.0
    assert statistics.median(delays) == pytest.approx(0.5, abs=0.05)


def test_after_a_master_goodbye_the_next_delay_spans_the_whole_window():
    """A planned master shutdown reaches the whole fleet at once: spread over 0..cap."""
    backoff = Backoff(1.0, 5.0, rng=random.Random(7))
    backoff.spread_fully()
    assert backoff.ceiling() == 5.0
    delays = []
    for seed in range(2000):
        fleet_member = Backoff(1.0, 5.0, rng=random.Random(seed))
        fleet_member.spread_fully()
        delays.append(fleet_member.next_delay())
    # No 100 ms slice of the window holds more than 5 % of the fleet (uniform: 2 %).
    slices = [0] * 50
    for delay in delays:
        slices[min(int(delay / 0.1), 49)] += 1
    assert max(slices) < 0.05 * len(delays), max(slices)
    backoff.reset()
    assert backoff.ceiling() == 1.0


def test_delays_are_spread_uniformly_over_the_window():
    """A fleet reconnecting at the cap spreads evenly over 0..cap (no stampede)."""
    rng = random.Random(42)
    delays = []
    for _ in range(5000):
        backoff = Backoff(0.5, 5.0, rng=rng)
        backoff.attempt = 10  # at the cap
        delays.append(backoff.next_delay())
    assert min(delays) >= 0 and max(delays) <= 5.0
    assert statistics.mean(delays) == pytest.approx(2.5, abs=0.1)
    buckets = [0] * 10
    for delay in delays:
        buckets[min(int(delay / 0.5), 9)] += 1
    # Each tenth of the window holds about a tenth of the fleet (uniform: 500 +- noise).
    assert all(400 < count < 600 for count in buckets), buckets


def test_reset_starts_over_and_huge_attempts_do_not_overflow():
    backoff = Backoff(0.1, 3.0)
    backoff.attempt = 10_000
    assert backoff.ceiling() == 3.0
    backoff.reset()
    assert backoff.attempt == 0 and backoff.ceiling() == 0.1


@pytest.mark.parametrize(("base", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_bad_bounds_are_refused(base, cap):
    with pytest.raises(ValueError, match="need 0 < base <= cap"):
        Backoff(base, cap)
