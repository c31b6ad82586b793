"""Histogram boundaries of the server's instruments."""

from __future__ import annotations

from layer_cache.instruments import MS_BUCKETS, SECONDS_BUCKETS, one_two_five


def test_one_two_five_steps_each_decade_and_ends_at_the_top() -> None:
    assert one_two_five(1, 100) == (1, 2.5, 5, 10, 25, 50, 100)
    assert one_two_five(0.001, 0.01) == (0.001, 0.0025, 0.005, 0.01)


def test_the_buckets_rise_from_a_memory_hit_to_a_stall() -> None:
    for buckets in (MS_BUCKETS, SECONDS_BUCKETS):
        assert list(buckets) == sorted(set(buckets))
    assert (MS_BUCKETS[0], MS_BUCKETS[-1]) == (0.05, 30_000)
    assert (SECONDS_BUCKETS[0], SECONDS_BUCKETS[-1]) == (0.001, 3_600)
