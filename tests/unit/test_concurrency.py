"""The self-tuning upload limit, driven by synthetic latencies (no clock, no sleeps)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from layer_cache.concurrency import (
    INITIAL_TUNED_LIMIT,
    MIN_WINDOW_SAMPLES,
    LatencyTuner,
    TunedLimit,
)

BASE_S = 0.020


def run_saturated(
    tuner: LatencyTuner,
    latency_at: Callable[[int], float],
    rounds: int,
    *,
    seed: int = 7,
    jitter: float = 0.05,
) -> list[int]:
    """Feed ``rounds`` round trips of a client that always fills every slot: each round, ``limit``
    requests finish with ``latency_at(limit)`` (± ``jitter``); returns the limit after each."""
    rng = random.Random(seed)
    limits = []
    for _ in range(rounds):
        in_flight = tuner.limit
        latency = latency_at(in_flight)
        for _ in range(max(in_flight, MIN_WINDOW_SAMPLES)):
            tuner.observe(latency * rng.uniform(1 - jitter, 1 + jitter), in_flight)
        limits.append(tuner.limit)
    return limits


def fixed_capacity(requests_per_s: float) -> Callable[[int], float]:
    """A server that serves ``requests_per_s``: beyond ``requests_per_s * BASE_S`` in flight the
    extra requests queue, so latency grows in proportion to concurrency."""
    return lambda in_flight: max(BASE_S, in_flight / requests_per_s)


def test_the_limit_starts_low_and_climbs_to_the_ceiling_while_latency_stays_flat() -> None:
    tuner = LatencyTuner(maximum=128)
    assert tuner.limit == INITIAL_TUNED_LIMIT
    limits = run_saturated(tuner, lambda _in_flight: BASE_S, rounds=12)
    assert limits == sorted(limits)  # never backs off when nothing queues
    assert limits[-1] == 128
    assert limits.index(128) <= 6  # doubling while nothing queues: 5, 10, 20, 40, 80, 128


def test_the_limit_settles_just_above_a_fixed_capacity_servers_knee() -> None:
    # 1,600 requests/s at 20 ms no-load: 32 in flight fill the server; more only queue.
    knee = 32
    capacity = knee / BASE_S
    latency_at = fixed_capacity(capacity)
    tuner = LatencyTuner(maximum=512)
    settled = run_saturated(tuner, latency_at, rounds=400)[100:]
    throughput = sum(limit / latency_at(limit) for limit in settled) / len(settled)
    assert throughput >= 0.97 * capacity  # the rare probes below the knee cost little
    assert max(settled) <= 1.3 * knee  # and not far past it: the queue stays short
    assert tuner.no_load_s == pytest.approx(BASE_S, rel=0.06)  # probes keep it from drifting


def test_the_limit_backs_off_when_latency_rises_and_climbs_again_when_it_falls() -> None:
    tuner = LatencyTuner(maximum=256)
    run_saturated(tuner, lambda _in_flight: BASE_S, rounds=20)
    assert tuner.limit == 256
    limits = run_saturated(tuner, fixed_capacity(16 / BASE_S), rounds=100)  # S3 got slower
    assert limits[-1] <= 24
    limits = run_saturated(tuner, lambda _in_flight: BASE_S, rounds=120)  # and recovered
    assert limits[-1] == 256


def test_a_throttle_burst_halves_the_limit_once_and_a_later_burst_halves_it_again() -> None:
    tuner = LatencyTuner(maximum=64, initial=64)
    tuner.throttled(in_use=64)
    assert tuner.limit == 32
    for _ in range(63):  # the rest of the burst: sent at the old rate
        tuner.throttled(in_use=64)
    assert tuner.limit == 32
    tuner.throttled(in_use=32)  # a fresh throttle after the burst
    assert tuner.limit == 16
    for _ in range(40):
        tuner.throttled(in_use=1)
    assert tuner.limit == 1  # never below one


def test_successes_drain_a_throttle_burst_so_the_next_throttle_counts() -> None:
    tuner = LatencyTuner(maximum=64, initial=64)
    tuner.throttled(in_use=8)
    for _ in range(7):
        tuner.succeeded()
    tuner.throttled(in_use=8)
    assert tuner.limit == 16


def test_after_a_throttle_growth_is_gradual_not_a_fresh_slow_start() -> None:
    tuner = LatencyTuner(maximum=128, initial=64)
    tuner.throttled(in_use=64)
    for _ in range(64):
        tuner.observe(BASE_S, 64)  # the requests in flight at the cut are ignored
    assert tuner.limit == 32
    limits = run_saturated(tuner, lambda _in_flight: BASE_S, rounds=5)
    assert limits[-1] <= 32 * 1.05**5 + 5


def test_an_unused_limit_does_not_grow() -> None:
    tuner = LatencyTuner(maximum=128, initial=16)
    for _ in range(20 * MIN_WINDOW_SAMPLES):
        tuner.observe(BASE_S, 4)  # the walk never keeps more than 4 uploads going
    assert tuner.limit == 16


@pytest.mark.parametrize(("maximum", "initial"), [(1, 5), (3, 5), (10, 1)])
def test_the_ceiling_and_the_start_are_respected(maximum: int, initial: int) -> None:
    tuner = LatencyTuner(maximum=maximum, initial=initial)
    assert tuner.limit == min(maximum, initial)
    assert max(run_saturated(tuner, lambda _in_flight: BASE_S, rounds=30)) == maximum


def test_the_rule_is_deterministic_in_its_samples() -> None:
    runs = [
        run_saturated(LatencyTuner(maximum=256), fixed_capacity(2000), rounds=80, seed=3)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_a_maximum_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        TunedLimit(0)


async def test_tuned_limit_hands_new_slots_to_waiters_when_it_grows() -> None:
    limit = TunedLimit(maximum=8, initial=1)
    await limit.acquire()
    waiters = [asyncio.create_task(limit.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert limit.in_use == 1
    for _ in range(MIN_WINDOW_SAMPLES):
        limit.record_latency(BASE_S)  # one slot, always in use, flat latency: double
    await asyncio.sleep(0)
    assert (limit.limit, limit.in_use) == (2, 2)
    limit.record_throttle()
    assert limit.limit == 1
    for _ in range(2):
        limit.release()
    await asyncio.sleep(0)
    assert limit.in_use == 1  # one waiter got the only slot; one still waits
    limit.release()
    await asyncio.gather(*waiters)
    assert limit.in_use == 1
