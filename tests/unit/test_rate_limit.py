"""The upload rate limits: the token bucket on a fake clock, the pacer on asyncio's.

The bucket's tests drive it the way the pacer does (first come, first served: each request is
granted at the earliest instant the bucket allows, not before the one ahead of it) through
``serve_in_order``, with times given, never read. The pacer's tests run on the real event loop
with rates high enough that each takes well under a second; their lower bounds (what the limit
forbids) are exact, their upper bounds leave room for a loaded machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layer_cache.rate_limit import TokenBucket, UploadPacer

SLACK = 1e-6  # relative: the bucket's float rounding at computed instants


def serve_in_order(
    buckets: Sequence[TokenBucket], requests: Sequence[tuple[float, Sequence[float]]]
) -> list[float]:
    """Grant ``(arrival, amount per bucket)`` requests in order, each at the earliest instant
    every bucket allows and not before the previous grant; the grant instants."""
    granted: list[float] = []
    previous = 0.0
    for arrival, amounts in requests:
        now = max(arrival, previous)
        due = max(b.ready_at(amount, now) for b, amount in zip(buckets, amounts, strict=True))
        for bucket, amount in zip(buckets, amounts, strict=True):
            bucket.take(amount, due)
        granted.append(due)
        previous = due
    return granted


def assert_within_bound(
    bucket: TokenBucket, instants: Sequence[float], amounts: Sequence[float]
) -> None:
    """Over every window between two grants: granted <= rate x window + max(burst, the last
    grant in it)."""
    for first in range(len(instants)):
        total = 0.0
        for last in range(first, len(instants)):
            total += amounts[last]
            window = instants[last] - instants[first]
            bound = bucket.rate * window + max(bucket.burst, amounts[last])
            assert total <= bound * (1 + SLACK) + SLACK, (first, last, total, bound)


# --------------------------------------------------------------------------------------------
# TokenBucket


def test_a_full_bucket_grants_its_burst_at_once_then_one_per_interval() -> None:
    bucket = TokenBucket.full(rate=10, burst=3, now=100.0)

    instants = serve_in_order([bucket], [(100.0, [1])] * 6)

    assert instants == pytest.approx([100.0, 100.0, 100.0, 100.1, 100.2, 100.3])


def test_an_amount_above_the_burst_waits_for_a_full_bucket_then_leaves_debt() -> None:
    bucket = TokenBucket.full(rate=100, burst=100, now=0.0)
    bucket.take(60, 0.0)

    # 500 needs a full bucket (100), due when the 60 taken have come back; it leaves 400 owed.
    assert bucket.ready_at(500, 0.0) == pytest.approx(0.6)
    bucket.take(500, 0.6)
    assert bucket.level(0.6) == pytest.approx(-400)
    # The next byte waits the debt out: 4 s, and 0.01 s more for itself.
    assert bucket.ready_at(1, 0.6) == pytest.approx(4.61)


def test_an_unused_grant_given_back_is_available_again_but_never_above_the_burst() -> None:
    bucket = TokenBucket.full(rate=1, burst=5, now=0.0)
    bucket.take(5, 0.0)
    bucket.give_back(5, 0.0)
    assert bucket.ready_at(5, 0.0) == 0.0
    bucket.give_back(5, 1.0)
    assert bucket.level(1.0) == 5


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0), (-1, 1), (float("inf"), 1)])
def test_a_bucket_needs_a_finite_positive_rate_and_burst(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="finite rate and burst"):
        TokenBucket.full(rate, burst, 0.0)


requests = st.lists(
    st.tuples(st.floats(0, 2, allow_nan=False), st.floats(0, 300, allow_nan=False)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.5, 1000, allow_nan=False),
    burst=st.floats(1, 200, allow_nan=False),
    gaps_and_amounts=requests,
)
def test_granted_over_any_window_is_at_most_rate_times_window_plus_the_burst(
    rate: float, burst: float, gaps_and_amounts: list[tuple[float, float]]
) -> None:
    """Amounts up to 1.5x the burst: those above it may push the bucket into debt, and the
    bound then allows the last grant of the window in place of the burst."""
    bucket = TokenBucket.full(rate, burst, now=0.0)
    arrivals, arrival = [], 0.0
    for gap, _ in gaps_and_amounts:
        arrival += gap
        arrivals.append(arrival)
    amounts = [min(amount, 1.5 * burst) for _, amount in gaps_and_amounts]

    instants = serve_in_order(
        [bucket], [(arrival, [amount]) for arrival, amount in zip(arrivals, amounts, strict=True)]
    )

    assert instants == sorted(instants)
    assert all(at >= arrival for at, arrival in zip(instants, arrivals, strict=True))
    assert_within_bound(bucket, instants, amounts)


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.5, 1000, allow_nan=False),
    burst=st.floats(1, 200, allow_nan=False),
    amounts=st.lists(st.floats(0, 600, allow_nan=False), min_size=1, max_size=60),
)
def test_requests_all_waiting_are_granted_no_later_than_the_limit_requires(
    rate: float, burst: float, amounts: list[float]
) -> None:
    """All asking at 0: request k goes when the burst plus what has accrued covers what went
    before it and its own need (its amount, at most the burst), and not a moment later."""
    bucket = TokenBucket.full(rate, burst, now=0.0)

    instants = serve_in_order([bucket], [(0.0, [amount]) for amount in amounts])

    before = 0.0
    for instant, amount in zip(instants, amounts, strict=True):
        expected = max(0.0, (before + min(amount, burst) - burst) / rate)
        assert instant == pytest.approx(expected, rel=1e-6, abs=SLACK * burst / rate)
        before += amount


@settings(max_examples=200, deadline=None)
@given(
    uploads_per_s=st.floats(1, 500, allow_nan=False),
    bytes_per_s=st.floats(100, 100_000, allow_nan=False),
    gaps_and_sizes=st.lists(
        st.tuples(st.floats(0, 0.5, allow_nan=False), st.integers(0, 150_000)),
        min_size=1,
        max_size=60,
    ),
)
def test_both_limits_together_each_hold_over_any_window(
    uploads_per_s: float, bytes_per_s: float, gaps_and_sizes: list[tuple[float, int]]
) -> None:
    uploads = TokenBucket.full(uploads_per_s, uploads_per_s, now=0.0)
    byte_bucket = TokenBucket.full(bytes_per_s, bytes_per_s, now=0.0)
    plan, arrival = [], 0.0
    for gap, size in gaps_and_sizes:
        arrival += gap
        plan.append((arrival, [1.0, float(size)]))

    instants = serve_in_order([uploads, byte_bucket], plan)

    assert_within_bound(uploads, instants, [1.0] * len(plan))
    assert_within_bound(byte_bucket, instants, [float(size) for _, size in gaps_and_sizes])


# --------------------------------------------------------------------------------------------
# UploadPacer


async def test_without_a_limit_acquire_returns_at_once() -> None:
    pacer = UploadPacer()

    assert not pacer.limited
    assert [await pacer.acquire(size) for size in (0, 1, 10**12)] == [0.0, 0.0, 0.0]


async def test_an_upload_that_fits_goes_at_once_and_the_next_waits_for_its_tokens() -> None:
    pacer = UploadPacer(uploads_per_s=20, burst_s=0.1)  # a burst of 2 uploads

    assert await pacer.acquire(1) == 0.0
    assert await pacer.acquire(1) == 0.0
    waited = await pacer.acquire(1)

    assert 0.049 <= waited < 0.5


async def test_uploads_from_several_caches_are_held_to_the_rate_and_served_in_turn() -> None:
    pacer = UploadPacer(uploads_per_s=500, burst_s=0.02)  # a burst of 10
    order: list[int] = []

    async def cache(number: int) -> None:
        for _ in range(100):
            await pacer.acquire(100)
            order.append(number)

    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for number in range(3):
            group.create_task(cache(number))
    elapsed = time.monotonic() - started

    assert elapsed >= (300 - 10) / 500
    assert elapsed < 3.0
    # The first cache takes the burst before the others ask; from then on, first come, first
    # served: each waits behind the others' pending uploads, so none gets ahead. On an idle
    # machine the turns alternate exactly; when the event loop stalls (a loaded CI machine),
    # the tokens of the stall are granted in one pass to whoever is queued and the order within
    # it may differ, so the share is checked per 60 grants, not per turn.
    assert order[:10] == [0] * 10
    for start in range(10, 250, 60):
        window = order[start : start + 60]
        assert all(14 <= window.count(number) <= 26 for number in range(3)), window


async def test_a_large_object_is_not_overtaken_by_small_ones_that_asked_after_it() -> None:
    pacer = UploadPacer(bytes_per_s=10_000, burst_s=0.01)  # a burst of 100 bytes
    assert await pacer.acquire(100) == 0.0
    done: list[str] = []

    async def upload(name: str, size: int) -> None:
        await pacer.acquire(size)
        done.append(name)

    async with asyncio.TaskGroup() as group:
        group.create_task(upload("large", 90))
        await asyncio.sleep(0)  # queued first
        group.create_task(upload("small-1", 5))
        group.create_task(upload("small-2", 5))

    assert done == ["large", "small-1", "small-2"]


async def test_an_object_larger_than_the_burst_goes_through_and_the_next_waits_its_debt() -> None:
    pacer = UploadPacer(bytes_per_s=100_000, burst_s=0.01)  # a burst of 1,000 bytes

    assert await pacer.acquire(5_000) == 0.0  # a full bucket lets it through
    waited = await pacer.acquire(1)

    assert waited >= 0.039  # the 4,000 bytes owed, then its own


async def test_a_cancelled_waiter_takes_nothing_and_the_next_goes_at_its_own_turn() -> None:
    pacer = UploadPacer(uploads_per_s=10, burst_s=0.1)  # a burst of 1: one every 100 ms
    assert await pacer.acquire(1) == 0.0
    first = asyncio.create_task(pacer.acquire(1))  # due at +100 ms
    middle = asyncio.create_task(pacer.acquire(1))  # +200 ms
    last = asyncio.create_task(pacer.acquire(1))  # +300 ms
    await asyncio.sleep(0)
    started = time.monotonic()

    middle.cancel()  # waiting behind the head
    first.cancel()  # the head, its timer armed
    waited = await last

    assert first.cancelled()
    assert middle.cancelled()
    assert 0.09 <= time.monotonic() - started < 0.28, "the cancelled waiters took tokens"
    assert waited >= 0.09


async def test_a_waiter_cancelled_after_its_grant_gives_the_tokens_back() -> None:
    pacer = UploadPacer(bytes_per_s=100, burst_s=1.0)  # a burst of 100 bytes
    assert await pacer.acquire(50) == 0.0
    head = asyncio.create_task(pacer.acquire(100))  # needs a full bucket: due in 0.5 s
    behind = asyncio.create_task(pacer.acquire(10))  # fits now, but waits its turn
    await asyncio.sleep(0)

    head.cancel()
    await asyncio.sleep(0)  # the head leaves and hands the turn on: ``behind`` is granted ...
    assert not behind.done()
    behind.cancel()  # ... and cancelled before it resumes

    with pytest.raises(asyncio.CancelledError):
        await behind
    with pytest.raises(asyncio.CancelledError):
        await head
    # Nothing was kept: the 50 bytes still banked go at once.
    assert await pacer.acquire(50) == 0.0


async def test_the_pacer_arms_one_timer_per_wait_and_never_polls() -> None:
    pacer = UploadPacer(uploads_per_s=1000, burst_s=0.005)  # a burst of 5
    fired = 0
    fire = pacer._fire

    def counting(due: float) -> None:
        nonlocal fired
        fired += 1
        fire(due)

    pacer._fire = counting  # type: ignore[method-assign]
    waits = await asyncio.gather(*(pacer.acquire(1) for _ in range(50)))

    waited = sum(1 for seconds in waits if seconds > 0)
    assert waited == 45
    assert fired <= waited
