"""Upload slots, and a limit on them that tunes itself from the uploads' completions.

``SlotPool`` is a pool of slots under a movable limit, waiters served first come, first served;
both upload limiters (``retry.AdaptiveLimit`` and ``TunedLimit``) are one. ``ConcurrencyTuner``
is the rule, with no clock and no I/O of its own: it is fed each upload's latency, the time it
ended and the slots in use, and judges the limit one window at a time by the window's completion
rate and median latency. By Little's law, rate = in flight / latency: while raising the limit
raises the rate, latency is not just queueing and the higher limit is kept; when the rate stays
flat, the extra uploads only queue (latency grew in step with the limit) and the limit goes back.

The rule is a state machine, all of it in ``TRANSITIONS``: the ``Phase`` says what the current
window measures, each judged window and each throttle is classified into an ``Outcome``, and the
row for the two names the ``Move`` of the estimate, the next phase and why. It climbs from a low
start by doublings judged on short windows (TCP's slow start), measuring a doubling that seems
not to pay again on long ones; then it holds, probing up or down every few windows, halves the
limit when latency jumps, and answers a throttle once per burst (throttles from requests sent at
the old rate are ignored). Three rules hold in every row: a move the ceiling or the whole number
of slots leaves no room for, or a rise the walk does not fill (under half the slots were busy),
holds instead; the window after a rise is measured and dropped (new slots open connections
first); uploads that started under another limit are not counted in the next window. The limit
stays between 1 and the ceiling. Nothing here owns a resource: a cancelled ``acquire`` gives
back or forgets its slot.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol, assert_never

# A window is judged after max(samples, limit) uploads and this long at least: short while
# climbing (a doubling from a low start gains far more than the noise), long otherwise (one
# quarter second's rate varies by +-15 % at a steady limit).
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


class Outcome(StrEnum):
    """What a judged window, or a throttle, says in the phase it came in."""

    FIRST = "first"  # the start's first window: nothing to compare it with
    PAID = "paid"  # the window's rate over the level's reached its phase's ``PAYS``
    NOT_PAID = "not_paid"
    MEASURED = "measured"  # the doubling over a long window
    KEPT = "kept"  # over long windows the doubling brings ``CLIMB_GAIN`` more than the level below
    KEPT_AT_CEILING = "kept_at_ceiling"  # and the ceiling leaves no room to double it again
    REFUSED = "refused"  # it brings less, or the walk did not fill it
    HELD = "held"  # one more window at the accepted level
    LATENCY_JUMP = "latency_jump"  # its median latency is ``LATENCY_ALARM`` times the level's
    PROBE_UP_DUE = "probe_up_due"  # held long enough: a probe is due, up
    PROBE_DOWN_DUE = "probe_down_due"  # down, every third probe
    THROTTLED_RISE = "throttled_rise"  # a throttle answering a rise above the accepted level
    THROTTLED = "throttled"  # any other throttle


class Move(StrEnum):
    """What a transition does to the estimate. To try a level is to go to it from a fresh window
    (the old level becomes the accepted one); to settle is to make it the accepted level and
    measure its rate afresh, keeping the latency it is held to."""

    STAY = "stay"  # the estimate as it is
    DOUBLE = "double"  # try twice the estimate
    HALVE = "halve"  # try half of it
    PROBE_UP = "probe_up"  # try the probe step above it (1.25x, one slot more at least)
    PROBE_UP_FURTHER = "probe_up_further"  # double the step (to 1.25x at most), then PROBE_UP
    PROBE_DOWN = "probe_down"  # try 3/4 of it (one slot less at least)
    TRY_BELOW = "try_below"  # try the accepted level, the one below the doubling
    CLIMB_ON = "climb_on"  # try twice the doubling (the accepted level), which stays accepted
    TO_DOUBLING = "to_doubling"  # try the doubling itself, which stays accepted
    RETURN = "return"  # back to the accepted level, its windows still counted; hold twice as long
    BACK = "back"  # settle at the accepted level
    BACK_CLOSER = "back_closer"  # settle at the accepted level, and halve the probe up's step
    DOWN = "down"  # settle at 3/4 of the estimate


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of the tuner's state machine."""

    move: Move
    phase: Phase  # the next one (hold, when the move cannot be tried)
    why: str


_P, _O, _M = Phase, Outcome, Move

TRANSITIONS: Mapping[tuple[Phase, Outcome], Transition] = MappingProxyType(
    {
        (_P.CLIMB, _O.FIRST): Transition(
            _M.DOUBLE, _P.CLIMB, "the start's rate is measured: try twice the limit"
        ),
        (_P.CLIMB, _O.PAID): Transition(
            _M.DOUBLE, _P.CLIMB, "the doubling brought 5 % more: double again"
        ),
        (_P.CLIMB, _O.NOT_PAID): Transition(
            _M.STAY, _P.CONFIRM, "a short window can mislead: measure the doubling over a long one"
        ),
        (_P.CLIMB, _O.THROTTLED_RISE): Transition(
            _M.BACK, _P.HOLD, "the climb is over at the level below, which ran without throttles"
        ),
        (_P.CLIMB, _O.THROTTLED): Transition(
            _M.DOWN, _P.HOLD, "throttled at the start, with no level below: 3/4, the climb is over"
        ),
        (_P.CONFIRM, _O.MEASURED): Transition(
            _M.TRY_BELOW, _P.RECHECK, "measure the level below over a long window too"
        ),
        (_P.CONFIRM, _O.THROTTLED): Transition(
            _M.DOWN, _P.HOLD, "3/4 of the doubling that ran without one so far; the climb is over"
        ),
        (_P.RECHECK, _O.KEPT): Transition(
            _M.CLIMB_ON, _P.CLIMB, "the doubling pays after all: the climb goes on from it"
        ),
        (_P.RECHECK, _O.KEPT_AT_CEILING): Transition(
            _M.TO_DOUBLING, _P.HOLD, "the doubling pays and is as high as the ceiling allows"
        ),
        (_P.RECHECK, _O.REFUSED): Transition(
            _M.STAY, _P.HOLD, "the doubling does not pay: the climb ends at the level below"
        ),
        (_P.RECHECK, _O.THROTTLED): Transition(
            _M.DOWN, _P.HOLD, "3/4 of the level below, which ran without one; the climb is over"
        ),
        (_P.HOLD, _O.HELD): Transition(
            _M.STAY, _P.HOLD, "one more window of the level's rate and latency"
        ),
        (_P.HOLD, _O.LATENCY_JUMP): Transition(
            _M.HALVE, _P.ALARM, "queueing, or a slower S3: see what half the limit costs"
        ),
        (_P.HOLD, _O.PROBE_UP_DUE): Transition(
            _M.PROBE_UP, _P.PROBE_UP, "see whether more pays (3 % more rate)"
        ),
        (_P.HOLD, _O.PROBE_DOWN_DUE): Transition(
            _M.PROBE_DOWN,
            _P.PROBE_DOWN,
            "see whether less loses nothing (a lucky climb's overshoot)",
        ),
        (_P.HOLD, _O.THROTTLED): Transition(
            _M.DOWN, _P.HOLD, "a throttle at a level that ran without one: 3/4"
        ),
        (_P.PROBE_UP, _O.PAID): Transition(
            _M.PROBE_UP_FURTHER,
            _P.PROBE_UP,
            "more paid: keep it and go on up, the step twice as big",
        ),
        (_P.PROBE_UP, _O.NOT_PAID): Transition(
            _M.RETURN, _P.HOLD, "more did not pay: back, and probe half as often"
        ),
        (_P.PROBE_UP, _O.THROTTLED_RISE): Transition(
            _M.BACK_CLOSER,
            _P.HOLD,
            "the cap lies between: back below it, and look closer next time",
        ),
        (_P.PROBE_DOWN, _O.PAID): Transition(_M.STAY, _P.HOLD, "less lost nothing: keep it"),
        (_P.PROBE_DOWN, _O.NOT_PAID): Transition(
            _M.RETURN, _P.HOLD, "less lost rate: back, and probe half as often"
        ),
        (_P.PROBE_DOWN, _O.THROTTLED): Transition(
            _M.DOWN, _P.HOLD, "a throttle at a level that ran without one: 3/4"
        ),
        (_P.ALARM, _O.PAID): Transition(
            _M.HALVE, _P.ALARM, "half lost under 3 % of the rate (the rise was queueing): again"
        ),
        (_P.ALARM, _O.NOT_PAID): Transition(
            _M.BACK, _P.HOLD, "half cost rate: back up, held to the latency that raised the alarm"
        ),
        (_P.ALARM, _O.THROTTLED): Transition(
            _M.DOWN, _P.HOLD, "a throttle at a level that ran without one: 3/4"
        ),
    }
)

# A change is kept (its window PAID) when its rate over the level's reaches this.
PAYS: Mapping[Phase, float] = MappingProxyType(
    {
        Phase.CLIMB: 1 + CLIMB_GAIN,
        Phase.PROBE_UP: 1 + PROBE_UP_GAIN,
        Phase.PROBE_DOWN: 1.0,
        Phase.ALARM: ALARM_KEEP,
    }
)


@dataclass(frozen=True, slots=True)
class WindowStats:
    """One window's completion rate (per second) and median latency (seconds)."""

    rate: float
    latency_s: float


class ConcurrencyTuner:
    """The self-tuning rule: deterministic in the samples and throttles it is fed. Each judged
    window and each throttle is classified (``_classify``, which changes nothing), recorded
    (``_learn``) and answered by its row of ``TRANSITIONS`` (``_apply``)."""

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
        self._doubling: WindowStats | None = None  # CONFIRM's window, for RECHECK
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
        first = self.level is None
        if self.phase is Phase.HOLD or first:
            self._record(window)
        outcome = self._classify(window, used=used, first=first)
        self._learn(outcome, window)
        self._apply(TRANSITIONS[self.phase, outcome], in_use, used=used)

    def throttled(self, in_use: int) -> None:
        """S3 asked us to slow down, once per burst: a probe (or a doubling) up goes back to the
        level below it, which ran without throttles; otherwise the limit falls to 3/4."""
        if self._stale_throttles > 0:
            self._stale_throttles -= 1
            return
        # A probe up is always above the accepted level; the climb is, once it has doubled.
        rise = self.phase is Phase.PROBE_UP or (
            self.phase is Phase.CLIMB and self.accepted < self.estimate
        )
        outcome = Outcome.THROTTLED_RISE if rise else Outcome.THROTTLED
        self._apply(TRANSITIONS[self.phase, outcome], in_use)
        self._stale_throttles = max(0, in_use - 1)

    def succeeded(self) -> None:
        """A call succeeded: one fewer throttle of the last burst can still be on its way."""
        self._stale_throttles = max(0, self._stale_throttles - 1)

    def _record(self, window: WindowStats) -> None:
        """One more window at the accepted level: its rate and latency are the mean and median of
        the last ``LEVEL_HISTORY``; the first after a settle keeps the latency held to before."""
        level = self.level
        carried = level.latency_s if level is not None and not self._hold else None
        self._hold.append(window)
        del self._hold[:-LEVEL_HISTORY]
        self._held += 1
        latency = statistics.median(w.latency_s for w in self._hold)
        self.level = WindowStats(
            statistics.fmean(w.rate for w in self._hold),
            latency if carried is None else carried,
        )

    def _classify(self, window: WindowStats, *, used: bool, first: bool) -> Outcome:
        """What ``window`` says in the current phase (in hold, once recorded)."""
        level = self.level
        assert level is not None  # recorded if this is the first window
        if first and self.phase is Phase.CLIMB:
            return Outcome.FIRST
        match self.phase:
            case Phase.HOLD:
                if window.latency_s >= LATENCY_ALARM * level.latency_s:
                    return Outcome.LATENCY_JUMP
                if self._held < self._hold_windows:
                    return Outcome.HELD
                down = (self._probes + 1) % 3 == 0
                return Outcome.PROBE_DOWN_DUE if down else Outcome.PROBE_UP_DUE
            case Phase.CONFIRM:
                return Outcome.MEASURED
            case Phase.RECHECK:  # the doubling (now the accepted level) against the level below
                above = self._doubling
                assert above is not None
                if above.rate < (1 + CLIMB_GAIN) * window.rate or not used:
                    return Outcome.REFUSED
                room = math.floor(min(2 * self.accepted, self.maximum)) > math.floor(self.accepted)
                return Outcome.KEPT if room else Outcome.KEPT_AT_CEILING
            case _:
                gained = window.rate / level.rate if level.rate > 0 else math.inf
                return Outcome.NOT_PAID if gained < PAYS[self.phase] else Outcome.PAID

    def _learn(self, outcome: Outcome, window: WindowStats) -> None:
        """What the window leaves on record, whatever the move."""
        match outcome:
            case Outcome.PAID:  # the level is accepted, and the next hold is short again
                self.accepted = self.estimate
                self._measure_from(window)
                self._hold_windows = HOLD_WINDOWS
            case Outcome.LATENCY_JUMP:  # the halves are judged against what changed, not before
                self.level = window
            case Outcome.PROBE_UP_DUE | Outcome.PROBE_DOWN_DUE:
                self._probes += 1
            case Outcome.MEASURED:
                self._doubling = window
            case Outcome.KEPT | Outcome.KEPT_AT_CEILING:
                assert self._doubling is not None
                self._measure_from(self._doubling)
            case Outcome.REFUSED:
                self._measure_from(window)

    def _apply(self, transition: Transition, in_use: int, *, used: bool = True) -> None:
        """Make ``transition``'s move and go to its phase."""
        phase, estimate = transition.phase, self.estimate
        match transition.move:
            case Move.STAY:
                self.phase = phase
            case Move.DOUBLE:
                self._move(2 * estimate, phase, in_use, used=used)
            case Move.HALVE:
                self._move(ALARM_DOWN * estimate, phase, in_use, used=used)
            case Move.PROBE_UP:
                self._move(self._probe_up_target(), phase, in_use, used=used)
            case Move.PROBE_UP_FURTHER:
                self._up_step = 1 + min(PROBE_UP - 1, 2 * (self._up_step - 1))
                self._move(self._probe_up_target(), phase, in_use, used=used)
            case Move.PROBE_DOWN:
                self._move(min(PROBE_DOWN * estimate, estimate - 1), phase, in_use, used=used)
            case Move.TRY_BELOW:
                self._move(self.accepted, phase, in_use, used=used)
            case Move.CLIMB_ON | Move.TO_DOUBLING:
                doubled = self.accepted
                factor = 2 if transition.move is Move.CLIMB_ON else 1
                self._move(factor * doubled, phase, in_use, used=used)
                self.accepted = doubled  # what a refused climb goes back to
            case Move.RETURN:  # the accepted level's connections are still open: no warm-up
                self._hold_windows = min(MAX_HOLD_WINDOWS, 2 * self._hold_windows)
                self.estimate = self.accepted
                self._restart(phase, in_use)
            case Move.BACK:
                self._settle(self.accepted, phase, in_use)
            case Move.BACK_CLOSER:
                self._up_step = 1 + (self._up_step - 1) / 2
                self._settle(self.accepted, phase, in_use)
            case Move.DOWN:
                self._settle(THROTTLE_DOWN * estimate, phase, in_use)
            case _:
                assert_never(transition.move)

    def _probe_up_target(self) -> float:
        """The next probe up: the current step above the estimate, one slot at least."""
        return max(self._up_step * self.estimate, self.estimate + 1)

    def _measure_from(self, window: WindowStats) -> None:
        """The accepted level's history starts afresh with ``window``."""
        self.level, self._hold, self._held = window, [window], 1

    def _move(self, estimate: float, phase: Phase, in_use: int, *, used: bool) -> None:
        """Try ``estimate`` for a window (stay in hold when it cannot be tried)."""
        target = max(1.0, min(float(self.maximum), estimate))
        if (not used and target > self.estimate) or math.floor(target) == self.limit:
            self.phase, self._held = Phase.HOLD, 1
            return
        # After a rise, the first uploads through the new slots open connections (a TCP, and
        # against AWS a TLS, handshake each) and queue behind one another (in traces, at about
        # 60 % of the level's rate): that window is not the level's, so it is measured and dropped.
        self._warming_up = math.floor(target) > self.limit
        self.accepted = self.estimate
        self.estimate, self.phase = target, phase
        self._stale_samples = in_use  # those in flight started under the old limit

    def _settle(self, estimate: float, phase: Phase, in_use: int) -> None:
        """Go (back) to ``estimate`` and measure its rate afresh; the latency it is held to
        stays (so a change that struck during a probe still raises the alarm)."""
        self.accepted = self.estimate = max(1.0, min(float(self.maximum), estimate))
        if self.level is not None:
            self.level = WindowStats(0.0, self.level.latency_s)
        self._hold = []
        self._restart(phase, in_use)

    def _restart(self, phase: Phase, in_use: int) -> None:
        """Go on in ``phase`` from a fresh window; those in flight started under the old limit
        and are not counted."""
        self.phase, self._held = phase, 0
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
