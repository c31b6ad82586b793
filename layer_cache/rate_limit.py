"""Rate limits on uploads, shared by a whole process: token buckets and an asyncio pacer.

``TokenBucket`` is pure (it has no clock: every call is told the time). ``rate`` tokens a second
accrue up to ``burst``; ``ready_at(amount, now)`` is the earliest instant it can grant
``amount``, ``take(amount, at)`` grants it. A grant needs ``min(amount, burst)`` tokens banked,
so an amount larger than the burst (a 40 MiB object under 10 MiB/s) waits for a full bucket and
then goes through, leaving the bucket in debt that later grants wait out: a huge object never
deadlocks. Over any window what is granted is at most ``rate x window + max(burst, the largest
single grant)`` (``rate x window + burst`` when no grant exceeds the burst), and over a long run
it tends to ``rate``.

``UploadPacer`` holds a bucket per configured limit (uploads a second, bytes a second; either,
both or none) and is shared by every cache of a process. ``acquire(size)`` returns once one
upload of ``size`` bytes fits every limit, taken from each bucket at the same instant. With no
limit it returns at once; when nobody waits and the buckets can grant, it takes without waiting.
Otherwise waiters are served first come, first served (so the caches share the limit fairly and a
large object is not starved by small ones): only the head of the queue has a timer, armed for the
instant its grant is due (no polling), and when it fires the head is granted and the next one's
instant computed. A cancelled waiter takes nothing: one not yet granted leaves the queue (the
next head's timer is re-armed), one granted but cancelled before it resumed gives its tokens
back. Nothing to shut down: the pacer owns no task, and a pending timer only wakes a waiter.
Time is ``time.monotonic``; timers are armed for the delay until the due instant.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

BURST_S = 1.0
"""A bucket holds this many seconds of its rate: what may go at once after a pause."""
_TOLERANCE = 1e-9  # a relative shortfall this small is float rounding at a computed due instant


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` banked; ``tokens`` as counted at ``at``."""

    rate: float
    burst: float
    tokens: float
    at: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        """A bucket with its whole burst banked at ``now``."""
        if not (rate > 0 and burst > 0 and math.isfinite(rate) and math.isfinite(burst)):
            raise ValueError("a token bucket needs a finite rate and burst above 0")
        return cls(rate, burst, burst, now)

    def level(self, now: float) -> float:
        """Tokens banked at ``now`` (negative while in debt)."""
        if now <= self.at:
            return self.tokens
        return min(self.burst, self.tokens + (now - self.at) * self.rate)

    def ready_at(self, amount: float, now: float) -> float:
        """The earliest instant, not before ``now``, at which ``amount`` may be taken."""
        now = max(now, self.at)
        need = min(amount, self.burst)
        missing = need - self.level(now)
        if missing <= _TOLERANCE * max(need, 1.0):
            return now
        return now + missing / self.rate

    def take(self, amount: float, at: float) -> None:
        """Grant ``amount`` at ``at`` (going into debt if it exceeds what is banked)."""
        at = max(at, self.at)
        self.tokens = self.level(at) - amount
        self.at = at

    def give_back(self, amount: float, now: float) -> None:
        """Return a grant that was not used (never above the burst)."""
        now = max(now, self.at)
        self.tokens = min(self.burst, self.level(now) + amount)
        self.at = now


@dataclass(slots=True)
class _Waiter:
    size: int
    future: asyncio.Future[None]


class UploadPacer:
    """Uploads a second and value bytes a second for one process (None: not limited)."""

    def __init__(
        self,
        uploads_per_s: float | None = None,
        bytes_per_s: float | None = None,
        *,
        burst_s: float = BURST_S,
    ) -> None:
        self.uploads_per_s = uploads_per_s
        self.bytes_per_s = bytes_per_s
        now = time.monotonic()
        self._uploads, self._bytes = (
            None if rate is None else TokenBucket.full(rate, rate * burst_s, now)
            for rate in (uploads_per_s, bytes_per_s)
        )
        self.limited = self._uploads is not None or self._bytes is not None
        self._queue: deque[_Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def acquire(self, size: int) -> float:
        """Wait until one upload of ``size`` bytes fits every limit, and take it; returns the
        seconds waited (0.0 when it went at once)."""
        if not self.limited:
            return 0.0
        started = time.monotonic()
        if not self._queue and self._due(size, started) <= started:
            self._take(size, started)
            return 0.0
        waiter = _Waiter(size, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        if len(self._queue) == 1:
            self._serve(started)
        try:
            await waiter.future  # resolved once the tokens are taken on this waiter's behalf
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._give_back(size)
            elif waiter in self._queue:
                was_head = self._queue[0] is waiter
                self._queue.remove(waiter)
                if was_head:
                    self._reschedule()
            raise
        return time.monotonic() - started

    def _due(self, size: int, now: float) -> float:
        due = now
        if self._uploads is not None:
            due = max(due, self._uploads.ready_at(1, now))
        if self._bytes is not None:
            due = max(due, self._bytes.ready_at(size, now))
        return due

    def _take(self, size: int, at: float) -> None:
        if self._uploads is not None:
            self._uploads.take(1, at)
        if self._bytes is not None:
            self._bytes.take(size, at)

    def _give_back(self, size: int) -> None:
        now = time.monotonic()
        if self._uploads is not None:
            self._uploads.give_back(1, now)
        if self._bytes is not None:
            self._bytes.give_back(size, now)
        self._reschedule()

    def _reschedule(self) -> None:
        """The head changed or tokens came back: serve from now, with a fresh timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._serve(time.monotonic())

    def _fire(self, due: float) -> None:
        self._timer = None
        # The timer may fire a hair early (the loop's clock resolution): the tokens were due at
        # ``due`` by the buckets' own arithmetic, so grant there.
        self._serve(max(time.monotonic(), due))

    def _serve(self, now: float) -> None:
        """Grant every waiter whose turn has come at ``now``, in order; arm a timer for the
        next one's due instant."""
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # cancelled, its task not yet resumed to leave the queue
                self._queue.popleft()
                continue
            due = self._due(head.size, now)
            if due > now:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(due - now, self._fire, due)
                return
            self._take(head.size, now)
            self._queue.popleft()
            head.future.set_result(None)
