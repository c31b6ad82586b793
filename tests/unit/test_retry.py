from __future__ import annotations

import asyncio
import random

import pytest

from layer_cache.errors import ErrorKind, StorageError
from layer_cache.retry import AdaptiveLimit, Backoff, RetryPolicy, call_with_retries


def test_backoff_is_full_jitter_under_a_doubling_ceiling_and_the_cap() -> None:
    backoff = Backoff(base_delay_s=0.5, max_delay_s=60.0, rng=random.Random(1))
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (8, 60.0), (10_000, 60.0)]:
        draws = [backoff.delay_s(attempt) for _ in range(500)]
        assert all(0.0 <= draw <= ceiling for draw in draws)
        assert max(draws) > ceiling * 0.9  # the whole range is used, not a fixed delay
        assert min(draws) < ceiling * 0.1


async def test_retries_wait_the_delays_of_the_policy_backoff() -> None:
    policy = RetryPolicy(
        backoff=Backoff(base_delay_s=0.001, max_delay_s=0.004, rng=random.Random(7))
    )
    same_draws = Backoff(base_delay_s=0.001, max_delay_s=0.004, rng=random.Random(7))
    failures = [StorageError("reset", kind=ErrorKind.TRANSIENT) for _ in range(4)]
    delays: list[float] = []

    async def flaky() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    result = await call_with_retries(
        flaky, policy, on_retry=lambda _exc, _attempt, delay: delays.append(delay)
    )
    assert result == "ok"
    assert delays == [same_draws.delay_s(attempt) for attempt in range(1, 5)]


def test_budget_limits_attempts_and_total_time() -> None:
    policy = RetryPolicy(max_attempts=3, max_elapsed_s=10)
    assert policy.allows(2, 1.0, 1.0)
    assert not policy.allows(3, 1.0, 1.0)
    assert not policy.allows(1, 9.5, 1.0)


def fast_policy(attempts: int = 5) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=attempts, backoff=Backoff(base_delay_s=0.001, max_delay_s=0.002)
    )


async def test_retryable_errors_are_retried_and_reported() -> None:
    failures = [
        StorageError("503", kind=ErrorKind.THROTTLED),
        StorageError("reset", kind=ErrorKind.TRANSIENT),
    ]
    retried: list[ErrorKind] = []

    async def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    result = await call_with_retries(
        flaky, fast_policy(), on_retry=lambda exc, _attempt, _delay: retried.append(exc.kind)
    )
    assert result == "ok"
    assert retried == [ErrorKind.THROTTLED, ErrorKind.TRANSIENT]


async def test_fatal_errors_are_raised_at_once() -> None:
    calls = 0

    async def denied() -> None:
        nonlocal calls
        calls += 1
        raise StorageError("403", kind=ErrorKind.ACCESS_DENIED)

    with pytest.raises(StorageError):
        await call_with_retries(denied, fast_policy())
    assert calls == 1


async def test_retryable_error_past_the_budget_is_raised() -> None:
    calls = 0

    async def always_throttled() -> None:
        nonlocal calls
        calls += 1
        raise StorageError("503", kind=ErrorKind.THROTTLED)

    with pytest.raises(StorageError):
        await call_with_retries(always_throttled, fast_policy(attempts=4))
    assert calls == 4


async def test_before_retry_runs_after_the_delay_and_before_the_next_attempt() -> None:
    events: list[str] = []

    async def refresh() -> None:
        events.append("refresh")

    async def expired_once() -> str:
        events.append("attempt")
        if events.count("attempt") == 1:
            error = StorageError("ExpiredToken", kind=ErrorKind.CREDENTIALS_EXPIRED)
            error.before_retry = refresh
            raise error
        return "ok"

    result = await call_with_retries(
        expired_once, fast_policy(), on_retry=lambda *_: events.append("on_retry")
    )
    assert result == "ok"
    assert events == ["attempt", "on_retry", "refresh", "attempt"]


async def test_a_failing_before_retry_ends_the_retries_with_its_error() -> None:
    attempts = 0
    refresh_failed = StorageError("refresh failed", kind=ErrorKind.INVALID_CREDENTIALS)

    async def refresh() -> None:
        raise refresh_failed

    async def expired() -> None:
        nonlocal attempts
        attempts += 1
        error = StorageError("ExpiredToken", kind=ErrorKind.CREDENTIALS_EXPIRED)
        error.before_retry = refresh
        raise error

    with pytest.raises(StorageError) as raised:
        await call_with_retries(expired, fast_policy())
    assert raised.value is refresh_failed
    assert attempts == 1


async def test_expired_credentials_without_a_refresh_fail_after_the_budget() -> None:
    attempts = 0

    async def static_credentials_expired() -> None:
        nonlocal attempts
        attempts += 1
        raise StorageError("ExpiredToken", kind=ErrorKind.CREDENTIALS_EXPIRED)

    with pytest.raises(StorageError) as raised:
        await call_with_retries(static_credentials_expired, fast_policy(attempts=3))
    assert raised.value.kind is ErrorKind.CREDENTIALS_EXPIRED
    assert attempts == 3


def test_throttling_halves_the_limit_once_per_burst_and_successes_raise_it() -> None:
    limit = AdaptiveLimit(16)
    limit.in_use = 16
    limit.record_throttle()
    assert limit.limit == 8
    for _ in range(15):  # the other 15 in flight were sent at the old rate: ignored
        limit.record_throttle()
    assert limit.limit == 8
    limit.record_throttle()  # a fresh throttle after the burst has drained
    assert limit.limit == 4
    for _ in range(4 + 5):  # limit successes in a row add one, then limit+1 more add another
        limit.record_success()
    assert limit.limit == 6
    assert AdaptiveLimit(1).limit == 1


def test_limit_never_drops_below_one() -> None:
    limit = AdaptiveLimit(2)
    for _ in range(5):
        limit.record_throttle()
    assert limit.limit == 1


async def test_acquire_waits_under_the_current_limit_first_come_first_served() -> None:
    limit = AdaptiveLimit(2)
    await limit.acquire()
    await limit.acquire()
    order: list[int] = []

    async def waiter(number: int) -> None:
        await limit.acquire()
        order.append(number)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert order == []
    limit.release()
    limit.release()
    await asyncio.sleep(0)
    assert order == [0, 1]
    limit.release()
    await asyncio.sleep(0)
    assert order == [0, 1, 2]
    await asyncio.gather(*tasks)
    assert limit.in_use == 2


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    limit = AdaptiveLimit(1)
    await limit.acquire()
    waiting = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    limit.release()
    assert limit.in_use == 0
    await asyncio.wait_for(limit.acquire(), timeout=1)
