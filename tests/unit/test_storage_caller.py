"""The storage caller: one call under the retry policy, each retry counted and logged, throttling
and successes fed to the cache's upload limit, a call that still fails raised as the cache's
failure (the retry rule itself: test_retry.py)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
import structlog

from layer_cache.cache_types import CacheType
from layer_cache.errors import CacheBackfillFailed, ErrorKind, StorageError
from layer_cache.retry import Backoff, RetryPolicy
from migrations_mode.progress import CacheProgress
from migrations_mode.storage_caller import StorageCaller
from tests.unit.backfill_fakes import DEADLINE_S, FAST_RETRIES, counter_values, metrics_reader


class RecordingLimit:
    """An ``UploadLimit`` that records the feedback it is given."""

    def __init__(self) -> None:
        self.limit = 4
        self.in_use = 0
        self.maximum = 4
        self.feedback: list[str] = []

    async def acquire(self) -> None:
        self.in_use += 1

    def release(self) -> None:
        self.in_use -= 1

    def record_success(self) -> None:
        self.feedback.append("success")

    def record_throttle(self) -> None:
        self.feedback.append("throttle")

    def record_latency(self, seconds: float) -> None:
        self.feedback.append("latency")


class Flaky:
    """A storage call that raises the given errors in turn, then returns ``"done"``."""

    def __init__(self, *errors: StorageError) -> None:
        self.errors = list(errors)
        self.attempts = 0
        self.first_attempt = asyncio.Event()

    async def __call__(self) -> str:
        self.attempts += 1
        self.first_attempt.set()
        if self.errors:
            raise self.errors.pop(0)
        return "done"


class LongestDelay(random.Random):
    """Full jitter at its ceiling: every backoff is the policy's whole delay."""

    def uniform(self, a: float, b: float) -> float:
        return b


def error(kind: ErrorKind) -> StorageError:
    return StorageError(f"PutObject failed ({kind.value})", kind=kind)


def make_caller(
    policy: RetryPolicy = FAST_RETRIES,
) -> tuple[StorageCaller, RecordingLimit, Callable[[str], dict[str, float]]]:
    """A caller for the cas cache, its limit, and a reader of its metrics by error class."""
    metrics, reader = metrics_reader()
    limit = RecordingLimit()
    caller = StorageCaller(
        CacheType.CAS,
        policy=policy,
        progress=CacheProgress(CacheType.CAS, metrics),
        upload_limit=limit,
    )
    return caller, limit, lambda name: counter_values(reader, f"layer_cache.backfill.{name}")


def nonzero(values: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in values.items() if value}


async def test_a_call_that_succeeds_at_once_returns_its_result_and_is_fed_to_the_limit() -> None:
    caller, limit, metric = make_caller()
    call = Flaky()

    with structlog.testing.capture_logs() as logs:
        assert await caller(call, key="ab01") == "done"

    assert call.attempts == 1
    assert limit.feedback == ["success"]
    assert caller.progress.stats.retries == {}
    assert logs == []
    assert nonzero(metric("retries")) == {}
    assert nonzero(metric("errors")) == {}


async def test_transient_failures_are_retried_counted_by_class_and_logged_with_the_key() -> None:
    caller, limit, metric = make_caller()
    call = Flaky(error(ErrorKind.TRANSIENT), error(ErrorKind.TRANSIENT))

    with structlog.testing.capture_logs() as logs:
        assert await caller(call, key="ab01") == "done"

    assert call.attempts == 3
    assert caller.progress.stats.retries == {"transient": 2}
    assert nonzero(metric("retries")) == {"transient": 2}
    assert nonzero(metric("errors")) == {}
    assert [
        (log["event"], log["log_level"], log["key"], log["error_class"], log["attempt"])
        for log in logs
    ] == [
        ("retrying storage call", "warning", "ab01", "transient", 1),
        ("retrying storage call", "warning", "ab01", "transient", 2),
    ]
    assert all(log["error"] == "PutObject failed (transient)" for log in logs)
    assert all(0 <= log["delay_s"] <= FAST_RETRIES.backoff.max_delay_s for log in logs)
    assert limit.feedback == ["success"], "a transient fault is no reason to slow down"


async def test_each_throttle_is_fed_to_the_upload_limit_and_the_success_after_it_too() -> None:
    caller, limit, metric = make_caller()
    call = Flaky(error(ErrorKind.THROTTLED), error(ErrorKind.TRANSIENT))

    with structlog.testing.capture_logs() as logs:
        await caller(call, key="ab01")

    assert limit.feedback == ["throttle", "success"]
    assert caller.progress.stats.retries == {"throttled": 1, "transient": 1}
    assert nonzero(metric("retries")) == {"throttled": 1, "transient": 1}
    assert [log["upload_concurrency_limit"] for log in logs] == [limit.limit, limit.limit]


async def test_a_call_without_a_key_logs_its_retries_with_none() -> None:
    caller, _, _ = make_caller()
    with structlog.testing.capture_logs() as logs:
        await caller(Flaky(error(ErrorKind.TRANSIENT)))
    assert [(log["event"], log["key"]) for log in logs] == [("retrying storage call", None)]


@pytest.mark.parametrize(
    "kind", [ErrorKind.ACCESS_DENIED, ErrorKind.MISSING_BUCKET, ErrorKind.OTHER]
)
async def test_a_permanent_failure_is_raised_at_once_as_the_caches_failure(
    kind: ErrorKind,
) -> None:
    caller, limit, metric = make_caller()
    cause = error(kind)
    call = Flaky(cause)

    with pytest.raises(CacheBackfillFailed) as raised:
        await caller(call, key="ab01")

    assert call.attempts == 1
    failure = raised.value
    assert (failure.cache_type, failure.key, failure.cause) == (CacheType.CAS, "ab01", cause)
    assert failure.__cause__ is cause
    assert str(failure) == f"cache cas at key ab01: PutObject failed ({kind.value})"
    assert nonzero(metric("errors")) == {kind.value: 1}
    assert caller.progress.stats.retries == {}
    assert limit.feedback == []


async def test_a_call_failing_until_the_attempts_are_spent_is_raised_after_its_retries() -> None:
    caller, limit, metric = make_caller()  # three attempts
    call = Flaky(*(error(ErrorKind.THROTTLED) for _ in range(5)))

    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(CacheBackfillFailed) as raised,
    ):
        await caller(call)

    assert call.attempts == 3
    assert [log["attempt"] for log in logs] == [1, 2]
    assert caller.progress.stats.retries == {"throttled": 2}
    assert nonzero(metric("errors")) == {"throttled": 1}
    assert raised.value.cause.kind is ErrorKind.THROTTLED
    assert raised.value.key is None
    assert str(raised.value) == "cache cas: PutObject failed (throttled)"
    assert limit.feedback == ["throttle", "throttle"], "no success after a failure"


async def test_an_error_that_is_not_a_storage_error_is_neither_retried_nor_wrapped() -> None:
    caller, limit, metric = make_caller()
    attempts = 0

    async def broken() -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError, match="a bug"):
        await caller(broken, key="ab01")
    assert attempts == 1
    assert limit.feedback == []
    assert nonzero(metric("errors")) == {}


async def test_a_cancelled_call_stops_in_its_backoff_without_another_attempt() -> None:
    # Every backoff is a minute: a call still running after the cancel would show.
    policy = RetryPolicy(
        max_attempts=8,
        max_elapsed_s=600,
        backoff=Backoff(base_delay_s=60, max_delay_s=60, rng=LongestDelay()),
    )
    caller, limit, metric = make_caller(policy)
    call = Flaky(*(error(ErrorKind.TRANSIENT) for _ in range(5)))
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(caller(call, key="ab01"))
        async with asyncio.timeout(DEADLINE_S):
            await call.first_attempt.wait()
            await asyncio.sleep(0)  # the first attempt fails; the backoff sleep begins
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    assert call.attempts == 1
    assert [(log["event"], log["delay_s"]) for log in logs] == [("retrying storage call", 60.0)]
    assert caller.progress.stats.retries == {"transient": 1}
    assert nonzero(metric("errors")) == {}, "a cancelled call is not a failed one"
    assert limit.feedback == []
