"""Retrying storage calls: exponential backoff with full jitter, within a budget, and AIMD.

``Backoff`` is pure: full-jitter delays, which spread clients out instead of synchronising their
retries (the write queue's entries wait by it too). ``RetryPolicy`` is a backoff and a budget,
and says whether another attempt fits the budget. ``call_with_retries`` retries only errors whose
``ErrorKind`` is retryable and raises the rest at once; before the next attempt it awaits the
error's ``before_retry``, which for an expired token forces a refresh of the S3 client's
credential chain (static credentials have nothing to refresh, so they fail the same way until
the budget is spent). ``AdaptiveLimit`` is one cache's upload cap and slot pool
(``concurrency.SlotPool``): additive increase after a run of successes, multiplicative decrease
on throttling. Nothing here owns a resource: a cancelled call stops in its backoff sleep, and a
cancelled ``acquire`` gives back or forgets its slot.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from layer_cache.concurrency import SlotPool
from layer_cache.errors import StorageError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: before retry ``attempt`` (1 for the first), a delay
    uniform in [0, min(``max_delay_s``, ``base_delay_s`` · 2^(attempt - 1))]. Full jitter spreads
    clients out instead of synchronising their retries; the exponent is capped, so any attempt
    count is safe. The storage calls' retries and the write queue's entries both wait by it."""

    base_delay_s: float
    max_delay_s: float
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay_s(self, attempt: int) -> float:
        """The delay before retry number ``attempt``."""
        exponent = min(max(attempt - 1, 0), 62)
        return self.rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2**exponent))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one call, and how long to wait between attempts."""

    max_attempts: int = 8
    max_elapsed_s: float = 120.0
    backoff: Backoff = field(default_factory=lambda: Backoff(base_delay_s=0.1, max_delay_s=10.0))

    def allows(self, attempts_made: int, elapsed_s: float, next_delay_s: float) -> bool:
        """True if one more attempt after ``next_delay_s`` stays within the budget."""
        return attempts_made < self.max_attempts and elapsed_s + next_delay_s <= self.max_elapsed_s


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    on_retry: Callable[[StorageError, int, float], None] | None = None,
) -> T:
    """Run ``call``; retry retryable ``StorageError``s within the policy's budget."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except StorageError as exc:
            if not exc.kind.retryable:
                raise
            delay = policy.backoff.delay_s(attempt)
            if not policy.allows(attempt, time.monotonic() - started, delay):
                raise
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            await asyncio.sleep(delay)
            if exc.before_retry is not None:
                await exc.before_retry()  # may raise a StorageError: then no further attempt


class AdaptiveLimit(SlotPool):
    """An AIMD-adjusted limit on concurrent slots, between 1 and ``maximum``, starting there.

    After a decrease, the throttle signals of calls that were already in flight (sent at the old
    rate) are ignored, so one burst of 503s halves the limit once rather than collapsing it to 1.
    Latency is not a signal here (``record_latency`` is accepted and ignored).
    """

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        super().__init__(maximum)
        self.maximum = maximum
        self._successes = 0
        self._stale_signals = 0

    def record_success(self) -> None:
        """A call succeeded; after ``limit`` successes in a row, raise the limit by one."""
        self._stale_signals = max(0, self._stale_signals - 1)
        self._successes += 1
        if self._successes >= self.limit and self.limit < self.maximum:
            self.limit += 1
            self._successes = 0
            self._wake()

    def record_throttle(self) -> None:
        """S3 asked us to slow down: halve the limit, once per burst."""
        self._successes = 0
        if self._stale_signals > 0:
            self._stale_signals -= 1
            return
        self.limit = max(1, self.limit // 2)
        self._stale_signals = max(0, self.in_use - 1)

    def record_latency(self, seconds: float) -> None:
        """AIMD reacts to throttling only; an upload's latency changes nothing."""
