"""Upload slots, and a limit on them that tunes itself from latency (Vegas-style).

``SlotPool`` is a pool of slots under a movable limit, waiters served first come, first served;
both upload limiters (``retry.AdaptiveLimit`` and ``TunedLimit``) are one. ``LatencyTuner`` is
the rule, with no clock and no I/O: it is fed each PUT's latency and the slots in use, and at the
end of each window (``max(16, limit)`` samples, about one round trip) it compares the window's
median latency with the no-load latency (the lowest window median since the last probe) to
estimate how many requests wait in a queue rather than travel: ``queued = in_use * (1 - no_load
/ median)``. With little queued it raises the limit (doubling at first, as TCP's slow start,
then 5 % a window, and only while the slots are really used); with much queued it cuts the limit
to what the no-load pipe holds plus a small queue (at most halving); a throttle halves it once
per burst. Every 50 windows one probe window runs at 3/4 of the limit, below the knee, and its
median becomes the no-load latency, so queueing cannot ratchet that figure up. The limit stays
between 1 and the ceiling. Samples from requests started before a cut are ignored, as are
throttles from requests sent at the old rate. Nothing here owns a resource: a cancelled
``acquire`` gives back or forgets its slot.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections import deque
from enum import StrEnum
from typing import Protocol

MIN_WINDOW_SAMPLES = 16
PROBE_EVERY_WINDOWS = 50
PROBE_SHARE = 0.75
INITIAL_TUNED_LIMIT = 5  # upstream's default uploads in flight: where the tuned limit starts
_STEADY_GROWTH = 1.05


class ConcurrencyMode(StrEnum):
    """How a cache's uploads in flight are limited."""

    FIXED = "fixed"
    """At the maximum, halved while S3 throttles and raised back after successes (AIMD)."""
    TUNED = "tuned"
    """From a low start, up while latency stays flat, down when it rises or S3 throttles."""


class UploadLimit(Protocol):
    """What the backfill needs of an upload limiter."""

    @property
    def limit(self) -> int: ...
    @property
    def in_use(self) -> int: ...
    @property
    def maximum(self) -> int: ...
    async def acquire(self) -> None: ...
    def release(self) -> None: ...
    def record_success(self) -> None: ...
    def record_throttle(self) -> None: ...
    def record_latency(self, seconds: float) -> None: ...


class SlotPool:
    """Slots under ``limit`` (set by a subclass), waiters served first come, first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Wait for a free slot under the current limit and take it."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the slot is handed over (in_use counted) when the waiter is woken
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back (synchronous, so it is safe in ``finally``)."""
        self.in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.in_use += 1


class LatencyTuner:
    """The self-tuning rule: deterministic in the samples and throttles it is fed."""

    def __init__(self, maximum: int, initial: int = INITIAL_TUNED_LIMIT) -> None:
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.maximum = maximum
        self.estimate = float(min(max(initial, 1), maximum))
        self.slow_start = True
        self.no_load_s: float | None = None
        self._window: list[float] = []
        self._window_peak = 0
        self._windows_since_probe = 0
        self._probe_restores: float | None = None  # the estimate a probe window interrupts
        self._stale_samples = 0
        self._stale_throttles = 0

    @property
    def limit(self) -> int:
        """The whole number of slots the estimate allows, between 1 and the maximum."""
        return max(1, min(self.maximum, math.floor(self.estimate)))

    def observe(self, latency_s: float, in_use: int) -> None:
        """One request's latency, with ``in_use`` slots taken when it ended."""
        if self._stale_samples > 0:
            self._stale_samples -= 1  # sent under the limit before the last cut
            return
        self._window.append(latency_s)
        self._window_peak = max(self._window_peak, in_use)
        if len(self._window) >= max(MIN_WINDOW_SAMPLES, self.limit):
            self._end_window(statistics.median(self._window), self._window_peak, in_use)

    def throttled(self, in_use: int) -> None:
        """S3 asked us to slow down: halve, once per burst."""
        if self._stale_throttles > 0:
            self._stale_throttles -= 1
            return
        self.slow_start = False
        self._cut(self.estimate / 2, in_use)
        self._stale_throttles = max(0, in_use - 1)

    def succeeded(self) -> None:
        """A call succeeded: one fewer throttle of the last burst can still be on its way."""
        self._stale_throttles = max(0, self._stale_throttles - 1)

    def _end_window(self, median_s: float, peak_in_use: int, in_use: int) -> None:
        self._window = []
        self._window_peak = 0
        if self._probe_restores is not None:  # the probe's median is the no-load latency now
            self.no_load_s = median_s
            self.estimate, self._probe_restores = self._probe_restores, None
            return
        no_load = median_s if self.no_load_s is None else min(self.no_load_s, median_s)
        self.no_load_s = no_load
        self._windows_since_probe += 1
        if self._windows_since_probe >= PROBE_EVERY_WINDOWS and self.estimate > 1:
            self._windows_since_probe = 0
            restore = self.estimate
            self._cut(self.estimate * PROBE_SHARE, in_use)
            self._probe_restores = restore
            return
        concurrency = min(self.estimate, float(peak_in_use))
        queued = concurrency * (1.0 - no_load / median_s) if median_s > 0 else 0.0
        small = max(3.0, 0.1 * self.estimate)
        large = max(6.0, 0.2 * self.estimate)
        if queued > large:
            self.slow_start = False
            self._cut(max(self.estimate / 2, concurrency - queued + small), in_use)
        elif queued > small:
            self.slow_start = False  # at the knee: hold
        elif 2 * peak_in_use >= self.estimate:  # only grow a limit that is being used
            grown = self.estimate * 2 if self.slow_start else self.estimate * _STEADY_GROWTH
            self.estimate = min(float(self.maximum), max(grown, self.estimate + 1))

    def _cut(self, estimate: float, in_use: int) -> None:
        self._probe_restores = None
        self.estimate = max(1.0, min(self.estimate, estimate))
        self._window = []
        self._window_peak = 0
        self._stale_samples = in_use  # those in flight were sent under the old limit


class TunedLimit(SlotPool):
    """A slot pool whose limit ``LatencyTuner`` sets from each upload's latency."""

    def __init__(self, maximum: int, initial: int = INITIAL_TUNED_LIMIT) -> None:
        self.tuner = LatencyTuner(maximum, initial)
        self.maximum = maximum
        super().__init__(self.tuner.limit)

    def record_latency(self, seconds: float) -> None:
        """One upload's duration (the caller still holds its slot)."""
        self.tuner.observe(seconds, self.in_use)
        self._follow()

    def record_throttle(self) -> None:
        """S3 asked us to slow down: halve the limit, once per burst."""
        self.tuner.throttled(self.in_use)
        self._follow()

    def record_success(self) -> None:
        """A call succeeded."""
        self.tuner.succeeded()

    def _follow(self) -> None:
        self.limit = self.tuner.limit
        self._wake()
