"""The eviction policies: byte bounds under any sequence of calls, each policy's own rule, and
the Zipf-mix measurement the default was chosen by (bench.cache_policy)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.cache_policy import build_parser, run
from layer_cache.eviction import (
    DEFAULT_POLICY,
    POLICIES,
    FrequencySketch,
    LruCache,
    PolicyName,
    S3FifoCache,
    WTinyLfuCache,
    make_policy,
)

ALL = list(PolicyName)

operation = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 40), st.integers(1, 300)),
    st.tuples(st.just("get"), st.integers(0, 40), st.just(0)),
    st.tuples(st.just("pop"), st.integers(0, 40), st.just(0)),
    st.tuples(st.just("resize"), st.integers(0, 1200), st.just(0)),
)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=150, deadline=None)
@given(operations=st.lists(operation, max_size=200))
def test_the_weight_never_exceeds_the_capacity_and_matches_what_is_held(
    name: PolicyName, operations: list[tuple[str, int, int]]
) -> None:
    cache: Any = make_policy(name, 1000)
    held: dict[int, int] = {}  # what the cache should hold: key -> weight
    for op, key, weight in operations:
        if op == "put":
            evicted = cache.put(key, f"v{key}", weight)
            if key not in held and (key, f"v{key}") not in evicted:
                held[key] = weight
        elif op == "get":
            assert cache.get(key) == (f"v{key}" if key in held else None)
            evicted = []
        elif op == "pop":
            assert cache.pop(key) == (f"v{key}" if key in held else None)
            held.pop(key, None)
            evicted = []
        else:
            evicted = cache.resize(key)
        for gone, value in evicted:
            assert value == f"v{gone}"
            held.pop(gone, None)
        assert cache.weight == sum(held.values()) <= cache.capacity
        assert len(cache) == len(held)
        assert dict(cache.items()) == {key: f"v{key}" for key in held}


@pytest.mark.parametrize("name", ALL)
def test_a_value_heavier_than_the_capacity_is_refused_and_a_held_key_is_not_replaced(
    name: PolicyName,
) -> None:
    cache: Any = make_policy(name, 100)
    assert cache.put("big", b"x", 101) == [("big", b"x")]
    assert "big" not in cache
    assert cache.put("k", b"first", 10) == []
    assert cache.put("k", b"second", 10) == []
    assert cache.peek("k") == b"first"
    assert cache.weight == 10


@pytest.mark.parametrize("name", ALL)
def test_a_negative_capacity_is_refused(name: PolicyName) -> None:
    with pytest.raises(ValueError, match="capacity"):
        make_policy(name, -1)


def test_lru_evicts_the_least_recently_read() -> None:
    cache: LruCache[str, str] = LruCache(30)
    for key in "abc":
        cache.put(key, key, 10)
    cache.get("a")
    assert cache.put("d", "d", 10) == [("b", "b")]


def test_s3fifo_keeps_a_read_value_while_one_hit_writes_stream_through() -> None:
    cache: S3FifoCache[str, str] = S3FifoCache(1000)
    cache.put("hot", "hot", 50)
    cache.get("hot")
    for number in range(500):  # writes never read: each leaves through the small queue
        cache.put(f"once{number}", "x", 50)
        if number % 10 == 0:
            cache.get("hot")
    assert "hot" in cache


def test_lru_loses_the_same_value_to_the_one_hit_writes() -> None:
    cache: LruCache[str, str] = LruCache(1000)
    cache.put("hot", "hot", 50)
    for number in range(500):
        cache.put(f"once{number}", "x", 50)
        if number % 30 == 0:
            cache.get("hot")
    assert "hot" not in cache


def test_s3fifo_sends_a_key_that_comes_back_as_a_ghost_to_main() -> None:
    cache: S3FifoCache[str, str] = S3FifoCache(1000)
    cache.put("k", "v", 50)
    for number in range(30):  # unread writes fill the cache: k leaves small, for the ghost
        cache.put(f"w{number}", "x", 50)
    assert "k" not in cache
    cache.put("k", "v", 50)  # remembered: straight to main
    for number in range(30, 60):  # more unread writes pass through small; k, in main, stays
        cache.put(f"w{number}", "x", 50)
    assert "k" in cache


def test_w_tinylfu_admits_a_newcomer_only_if_asked_for_more_often_than_its_victim() -> None:
    cache: WTinyLfuCache[str, str] = WTinyLfuCache(1000)
    for number in range(10):
        cache.put(f"main{number}", "m", 99)
        for _ in range(3):
            cache.get(f"main{number}")
    for number in range(100):  # never read: always lose against read main entries
        cache.put(f"cold{number}", "c", 99)
    assert all(f"main{number}" in cache for number in range(10))


def test_the_frequency_sketch_counts_and_halves_with_age() -> None:
    sketch = FrequencySketch(1024)
    for _ in range(10):
        sketch.increment("a")
    assert sketch.frequency("a") == 10
    assert sketch.frequency("never") == 0
    for _ in range(sketch.sample_size - 10):  # the sample is full: every counter halves
        sketch.increment("b")
    assert sketch.frequency("a") == 5
    assert sketch.frequency("b") == FrequencySketch.MAX // 2


def test_the_registry_names_every_policy() -> None:
    assert set(POLICIES) == set(PolicyName)
    assert DEFAULT_POLICY is PolicyName.S3FIFO


def small_mix(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(
        ["--keys", "5000", "--requests", "60000", "--policies", "lru", "s3fifo", *extra]
    )


def test_s3fifo_the_default_beats_lru_on_the_zipf_mix_at_every_size() -> None:
    results = run(small_mix())
    by_size: dict[float, dict[str, float]] = {}
    for result in results:
        by_size.setdefault(result.size_share, {})[result.policy] = result.hit_ratio
    assert len(by_size) == 3
    for ratios in by_size.values():
        assert ratios["s3fifo"] > ratios["lru"]
