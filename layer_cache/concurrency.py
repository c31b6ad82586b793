"""Upload slots, and a limit on them that tunes itself from the uploads' completions.

``SlotPool`` is a pool of slots under a movable limit, waiters served first come, first served;
both upload limiters (``retry.AdaptiveLimit`` and ``TunedLimit``) are one. ``ConcurrencyTuner``
is the rule, with no clock and no I/O of its own: it is fed each upload's latency, the time it
ended and the slots in use, and judges the limit one window at a time by the window's completion
rate and median latency. By Little's law, rate = in flight / latency: while raising the limit
raises the rate, latency is not just queueing and the higher limit is kept; when the rate stays
flat, the extra uploads only queue (latency grew in step with the limit) and the limit goes
back. So it doubles from a low start while each doubling brings at least 5 % more (TCP's slow
start), judged on short windows (``max(32, limit)`` uploads, a quarter second at least); a
doubling that seems not to pay is measured again over a long window (``max(64, limit)``
uploads, 0.6 s at least: one quarter second's rate varies by +-15 % at a steady limit), then
the level below it too, and kept only if it brings 5 % more. After every rise one window is
measured and dropped: the first uploads through new slots open connections (TCP, and against
AWS TLS, handshakes) and ran at about 60 % of the level's rate in traces. Then it holds: the
accepted level's rate and latency are the mean and median of its last 8 windows, kept across
probes that go back to it; every few windows it tries 1.25x (kept for 3 % more, and then tried
again) or 0.75x (kept if nothing is lost). A probe that does not pay doubles the hold before the
next (4 windows, up to 32), so at the ceiling or a settled level futile probes grow rare; one
that pays resets it. A window whose median latency is 1.5x the level's halves it at once, and
again while halving costs under 3 % of the rate (the rise was queueing). A throttle ends the
climb and acts once per burst (throttles from requests sent at the old rate are ignored): one
that answers a probe or a doubling up sends the limit back to the level below, which ran
without throttles, and halves the next probe's step (1.25x, 1.125x, ...; a probe that pays
doubles it back), so under a request-rate cap the limit closes in on the highest level that
draws none; any other throttle lowers the limit to 3/4.
Uploads that started under another limit are not counted in the next window, and a limit the
walk does not fill is not raised. The limit stays between 1 and the ceiling. Nothing here owns
a resource: a cancelled ``acquire`` gives back or forgets its slot.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

# A window is judged after max(samples, limit) uploads and this long at least: short while
# climbing (a doubling from a low start gains far more than the noise), long otherwise.
MIN_WINDOW_SAMPLES, MIN_WINDOW_S = 64, 0.6
CLIMB_WINDOW_SAMPLES, CLIMB_WINDOW_S = 32, 0.25
INITIAL_TUNED_LIMIT = 5  # upstream's default uploads in flight: where the tuned limit starts
CLIMB_GAIN = 0.05  # a doubling is kept if the rate grows by this share
HOLD_WINDOWS = 4  # windows measured at a level between two probes, at first
MAX_HOLD_WINDOWS = 32  # each refused probe doubles the hold, up to this; a kept one resets it
PROBE_UP, PROBE_UP_GAIN = 1.25, 0.03
PROBE_DOWN = 0.75  # kept if the rate does not fall
LATENCY_ALARM, ALARM_DOWN, ALARM_KEEP = 1.5, 0.5, 0.97
THROTTLE_DOWN = 0.75  # a throttle at a level that ran without one
LEVEL_HISTORY = 8  # windows at the accepted level that its rate and latency are averaged over


class ConcurrencyMode(StrEnum):
    """How a cache's uploads in flight are limited."""

    TUNED = "tuned"
    """The default: from a low start, up while that pays, down when latency rises or S3
    throttles."""
    FIXED = "fixed"
    """At the maximum, halved while S3 throttles and raised back after successes (AIMD)."""


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
            elif waiter in self._waiters:  # a release may have dropped it already
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


class Phase(StrEnum):
    """What the tuner's current window measures."""

    CLIMB = "climb"  # a doubling
    CONFIRM = "confirm"  # a doubling that did not seem to pay, again over a long window
    RECHECK = "recheck"  # then the level below it over a long window, for a fair comparison
    HOLD = "hold"  # the accepted level
    PROBE_UP = "probe_up"
    PROBE_DOWN = "probe_down"
    ALARM = "alarm"  # half the level, after latency jumped


@dataclass(frozen=True, slots=True)
class WindowStats:
    """One window's completion rate (per second) and median latency (seconds)."""

    rate: float
    latency_s: float


class ConcurrencyTuner:
    """The self-tuning rule: deterministic in the samples and throttles it is fed."""

    def __init__(
        self,
        maximum: int,
        initial: int = INITIAL_TUNED_LIMIT,
        *,
        min_window_s: float = MIN_WINDOW_S,
        climb_window_s: float = CLIMB_WINDOW_S,
    ) -> None:
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.maximum = maximum
        self.min_window_s = min_window_s
        self.climb_window_s = climb_window_s
        self.estimate = float(min(max(initial, 1), maximum))
        self.phase = Phase.CLIMB
        self.accepted = self.estimate  # the level a probe or a failed climb goes back to
        self.level: WindowStats | None = None  # measured at the accepted level
        self._hold: list[WindowStats] = []  # the accepted level's last windows
        self._held = 0  # windows at the accepted level since the last probe
        self._probes = 0
        self._hold_windows = HOLD_WINDOWS
        self._up_step = PROBE_UP  # a probe up that draws a throttle halves the next one's step
        self._doubled: tuple[float, WindowStats] | None = None  # CONFIRM's estimate and window
        self._ends: list[float] = []
        self._latencies: list[float] = []
        self._peak_in_use = 0
        self._stale_samples = 0
        self._warming_up = False  # the window after a rise is not judged
        self._stale_throttles = 0

    @property
    def limit(self) -> int:
        """The whole number of slots the estimate allows, between 1 and the maximum."""
        return max(1, min(self.maximum, math.floor(self.estimate)))

    def observe(self, latency_s: float, ended_at: float, in_use: int) -> None:
        """One upload: its latency, when it ended (monotonic seconds), slots in use then."""
        if self._stale_samples > 0:
            self._stale_samples -= 1  # started under the limit before the last change
            return
        self._ends.append(ended_at)
        self._latencies.append(latency_s)
        self._peak_in_use = max(self._peak_in_use, in_use)
        elapsed = self._ends[-1] - self._ends[0]
        samples, seconds = (
            (CLIMB_WINDOW_SAMPLES, self.climb_window_s)
            if self.phase is Phase.CLIMB
            else (MIN_WINDOW_SAMPLES, self.min_window_s)
        )
        if len(self._ends) < max(samples, self.limit) or elapsed < seconds:
            return
        window = WindowStats(
            rate=(len(self._ends) - 1) / elapsed if elapsed > 0 else math.inf,
            latency_s=statistics.median(self._latencies),
        )
        used = 2 * self._peak_in_use >= self.limit
        self._ends, self._latencies, self._peak_in_use = [], [], 0
        if self._warming_up:
            self._warming_up = False
            return
        self._judge(window, used, in_use)

    def throttled(self, in_use: int) -> None:
        """S3 asked us to slow down, once per burst: a probe (or a doubling) up goes back to the
        level below it, which ran without throttles; otherwise the limit falls to 3/4."""
        if self._stale_throttles > 0:
            self._stale_throttles -= 1
            return
        probing_up = self.phase in (Phase.CLIMB, Phase.PROBE_UP) and self.accepted < self.estimate
        if probing_up and self.phase is Phase.PROBE_UP:
            self._up_step = 1 + (self._up_step - 1) / 2  # the cap lies below: look closer
        self._settle(self.accepted if probing_up else THROTTLE_DOWN * self.estimate, in_use)
        self._stale_throttles = max(0, in_use - 1)

    def succeeded(self) -> None:
        """A call succeeded: one fewer throttle of the last burst can still be on its way."""
        self._stale_throttles = max(0, self._stale_throttles - 1)

    def _judge(self, window: WindowStats, used: bool, in_use: int) -> None:
        level = self.level
        if self.phase is Phase.HOLD or level is None:
            carried = level.latency_s if level is not None and not self._hold else None
            self._hold.append(window)
            del self._hold[:-LEVEL_HISTORY]
            self._held += 1
            latency = statistics.median(w.latency_s for w in self._hold)
            self.level = WindowStats(
                statistics.fmean(w.rate for w in self._hold),
                latency if carried is None else carried,  # a settle keeps the old reference
            )
            if self.phase is Phase.CLIMB:
                self._move(2 * self.estimate, Phase.CLIMB, in_use, used=used)
            elif window.latency_s >= LATENCY_ALARM * self.level.latency_s:
                self.level = window  # the halves are judged against what changed, not before
                self._move(ALARM_DOWN * self.estimate, Phase.ALARM, in_use)
            elif self._held >= self._hold_windows:
                self._probe(in_use, used=used)
            return
        if self.phase is Phase.CONFIRM:
            self._doubled = (self.estimate, window)
            self._move(self.accepted, Phase.RECHECK, in_use)
            return
        if self.phase is Phase.RECHECK:
            self._recheck(window, used, in_use)
            return
        gained = window.rate / level.rate if level.rate > 0 else math.inf
        keep = {
            Phase.CLIMB: 1 + CLIMB_GAIN,
            Phase.PROBE_UP: 1 + PROBE_UP_GAIN,
            Phase.PROBE_DOWN: 1.0,
            Phase.ALARM: ALARM_KEEP,
        }[self.phase]
        if gained < keep and self.phase is Phase.CLIMB:
            self.phase = Phase.CONFIRM  # stay, and measure it over a long window
            return
        if gained < keep and self.phase in (Phase.PROBE_UP, Phase.PROBE_DOWN):
            self._hold_windows = min(MAX_HOLD_WINDOWS, 2 * self._hold_windows)
            self._return(in_use)
            return
        if gained < keep:
            self._settle(self.accepted, in_use)
            return
        self.accepted = self.estimate
        self._measure_from(window)
        self._hold_windows = HOLD_WINDOWS
        if self.phase is Phase.CLIMB:
            self._move(2 * self.estimate, Phase.CLIMB, in_use, used=used)
        elif self.phase is Phase.ALARM:  # half lost (almost) nothing: try half again
            self._move(ALARM_DOWN * self.estimate, Phase.ALARM, in_use)
        elif self.phase is Phase.PROBE_UP:  # more paid off: keep going up, a step twice as big
            self._up_step = 1 + min(PROBE_UP - 1, 2 * (self._up_step - 1))
            self._move(self._probe_up_target(), Phase.PROBE_UP, in_use, used=used)
        else:
            self.phase = Phase.HOLD

    def _recheck(self, below: WindowStats, used: bool, in_use: int) -> None:
        """Both levels measured over long windows: the doubling is kept (and the climb goes on
        from it) if it brings ``CLIMB_GAIN`` more, else the limit stays at the level below."""
        assert self._doubled is not None
        (doubled, above), self._doubled = self._doubled, None
        if above.rate < (1 + CLIMB_GAIN) * below.rate or not used:
            self._measure_from(below)
            self.phase = Phase.HOLD
            return
        self._measure_from(above)
        if math.floor(min(2 * doubled, self.maximum)) > math.floor(doubled):
            self._move(2 * doubled, Phase.CLIMB, in_use)
        else:
            self._move(doubled, Phase.HOLD, in_use)
        self.accepted = doubled  # what a refused climb goes back to

    def _probe(self, in_use: int, *, used: bool) -> None:
        """Every third probe goes down, the others up (when the ceiling or the walk leaves no
        room above, an up turn is skipped)."""
        self._probes += 1
        if self._probes % 3 == 0:
            self._move(min(PROBE_DOWN * self.estimate, self.estimate - 1), Phase.PROBE_DOWN, in_use)
        else:
            self._move(self._probe_up_target(), Phase.PROBE_UP, in_use, used=used)

    def _probe_up_target(self) -> float:
        """The next probe up: the current step above the estimate, one slot at least."""
        return max(self._up_step * self.estimate, self.estimate + 1)

    def _measure_from(self, window: WindowStats) -> None:
        """The accepted level's history starts afresh with ``window``."""
        self.level, self._hold, self._held = window, [window], 1

    def _move(self, estimate: float, phase: Phase, in_use: int, *, used: bool = True) -> None:
        """Try ``estimate`` for a window (stay in hold when it cannot be tried)."""
        target = max(1.0, min(float(self.maximum), estimate))
        if (not used and target > self.estimate) or math.floor(target) == self.limit:
            self.phase, self._held = Phase.HOLD, 1
            return
        # After a rise, the first uploads through the new slots open connections (a TCP, and
        # against AWS a TLS, handshake each) and queue behind one another: that window is not
        # the level's, so it is measured and dropped.
        self._warming_up = math.floor(target) > self.limit
        self.accepted = self.estimate
        self.estimate, self.phase = target, phase
        self._stale_samples = in_use  # those in flight started under the old limit

    def _settle(self, estimate: float, in_use: int) -> None:
        """Go (back) to ``estimate`` and measure its rate afresh; the latency it is held to
        stays (so a change that struck during a probe still raises the alarm)."""
        self.accepted = self.estimate = max(1.0, min(float(self.maximum), estimate))
        if self.level is not None:
            self.level = WindowStats(0.0, self.level.latency_s)
        self._hold = []
        self._hold_again(in_use)

    def _return(self, in_use: int) -> None:
        """A probe did not pay: back to the accepted level, whose windows still count (its
        connections are still open, so no warm-up)."""
        self.estimate = self.accepted
        self._hold_again(in_use)

    def _hold_again(self, in_use: int) -> None:
        """Hold at the estimate from a fresh window; those in flight started under the old
        limit and are not counted."""
        self.phase, self._held = Phase.HOLD, 0
        self._ends, self._latencies, self._peak_in_use = [], [], 0
        self._stale_samples, self._warming_up = in_use, False


class TunedLimit(SlotPool):
    """A slot pool whose limit ``ConcurrencyTuner`` sets from the uploads' completions."""

    def __init__(self, maximum: int, initial: int = INITIAL_TUNED_LIMIT) -> None:
        self.tuner = ConcurrencyTuner(maximum, initial)
        self.maximum = maximum
        super().__init__(self.tuner.limit)

    def record_latency(self, seconds: float, ended_at: float | None = None) -> None:
        """One upload's duration, ending now unless ``ended_at`` (monotonic) says otherwise;
        the caller still holds its slot."""
        now = time.monotonic() if ended_at is None else ended_at
        self.tuner.observe(seconds, now, self.in_use)
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
