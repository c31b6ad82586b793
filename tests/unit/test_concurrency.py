"""The self-tuning upload limit, driven by synthetic completions (no clock, no sleeps)."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from layer_cache.concurrency import (
    CLIMB_WINDOW_S,
    CLIMB_WINDOW_SAMPLES,
    HOLD_WINDOWS,
    INITIAL_TUNED_LIMIT,
    MAX_HOLD_WINDOWS,
    MIN_WINDOW_S,
    MIN_WINDOW_SAMPLES,
    TRANSITIONS,
    ConcurrencyTuner,
    Outcome,
    Phase,
    Transition,
    TunedLimit,
)

BASE_S = 0.020
Latency = Callable[[int], float]


def tuner_for(maximum: int, initial: int = INITIAL_TUNED_LIMIT) -> ConcurrencyTuner:
    """A tuner whose windows end on their sample count alone (the simulations' rounds are 20 ms
    apart; the windows' time floors have tests of their own)."""
    return ConcurrencyTuner(maximum, initial, min_window_s=0.0, climb_window_s=0.0)


class ClosedLoop:
    """A client that keeps every slot busy: each round, ``max(limit, 32)`` uploads end, spaced
    so that the rate is ``limit / latency`` (Little's law), each with ``latency_at(limit)``
    seconds of latency; both ± ``jitter``, from a seeded generator."""

    def __init__(self, tuner: ConcurrencyTuner, *, seed: int = 7, jitter: float = 0.05) -> None:
        self.tuner = tuner
        self.now = 0.0
        self.rng = random.Random(seed)
        self.jitter = jitter

    def _noisy(self, value: float) -> float:
        return value * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    def run(self, latency_at: Latency, rounds: int) -> list[int]:
        """The limit after each round."""
        limits = []
        for _ in range(rounds):
            in_flight = self.tuner.limit
            latency = latency_at(in_flight)
            for _ in range(max(in_flight, MIN_WINDOW_SAMPLES)):
                self.now += self._noisy(latency / in_flight)
                self.tuner.observe(self._noisy(latency), self.now, in_flight)
            limits.append(self.tuner.limit)
        return limits


def flat(_in_flight: int) -> float:
    return BASE_S


def fixed_capacity(requests_per_s: float) -> Latency:
    """A server that serves ``requests_per_s``: beyond ``requests_per_s * BASE_S`` in flight the
    extra requests queue, so latency grows in proportion to concurrency."""
    return lambda in_flight: max(BASE_S, in_flight / requests_per_s)


def throughput(latency_at: Latency, limits: list[int]) -> float:
    """Mean completions per second over the rounds, each at its limit."""
    return sum(limit / latency_at(limit) for limit in limits) / len(limits)


def test_the_limit_starts_low_and_doubles_to_the_ceiling_while_latency_stays_flat() -> None:
    tuner = tuner_for(maximum=128)
    assert tuner.limit == INITIAL_TUNED_LIMIT
    limits = ClosedLoop(tuner).run(flat, rounds=60)
    climb = limits[: limits.index(128) + 1]
    assert climb == sorted(climb)
    assert set(climb) <= {5, 10, 20, 40, 80, 128}  # doubling: each brought twice the rate
    assert len(climb) <= 10
    assert min(limits[len(climb) :]) >= 96  # only the brief probes below the ceiling
    assert throughput(flat, limits[len(climb) :]) >= 0.95 * 128 / BASE_S


def test_the_limit_settles_near_a_fixed_capacity_servers_knee() -> None:
    knee = 32  # 1,600 requests/s at 20 ms: 32 in flight fill the server; more only queue
    capacity = knee / BASE_S
    latency_at = fixed_capacity(capacity)
    limits = ClosedLoop(tuner_for(maximum=512)).run(latency_at, rounds=400)
    settled = limits[50:]
    assert throughput(latency_at, settled) >= 0.95 * capacity
    assert sum(settled) / len(settled) <= 1.5 * knee  # the queue stays short
    assert max(limits[200:]) <= 2 * knee  # probes down bring a lucky climb's overshoot back


def test_the_limit_backs_off_when_s3_slows_down_and_climbs_again_when_it_recovers() -> None:
    loop = ClosedLoop(tuner_for(maximum=256))
    assert loop.run(flat, rounds=20)[-1] == 256
    slower = fixed_capacity(16 / BASE_S)  # now 16 in flight fill it
    limits = loop.run(slower, rounds=150)
    assert max(limits[-20:]) <= 48
    assert throughput(slower, limits[-50:]) >= 0.95 * 16 / BASE_S
    limits = loop.run(flat, rounds=200)  # recovered: probes up find the rate growing again
    assert limits[-1] >= 192


def test_more_latency_without_queueing_raises_the_limit() -> None:
    loop = ClosedLoop(tuner_for(maximum=512))
    knee = fixed_capacity(32 / BASE_S)  # 1,600/s
    loop.run(knee, rounds=100)
    farther = lambda in_flight: 0.1 + knee(in_flight)  # noqa: E731 - 100 ms more of network
    limits = loop.run(farther, rounds=300)
    assert throughput(farther, limits[-50:]) >= 0.8 * throughput(farther, [512])


def test_a_throttle_burst_lowers_the_limit_once_and_a_later_burst_lowers_it_again() -> None:
    tuner = tuner_for(maximum=64, initial=64)
    tuner.throttled(in_use=64)
    assert (tuner.limit, tuner.phase) == (48, Phase.HOLD)  # 3/4, and the climb is over
    for _ in range(63):  # the rest of the burst: sent at the old rate
        tuner.throttled(in_use=64)
    assert tuner.limit == 48
    tuner.throttled(in_use=48)  # a fresh throttle after the burst
    assert tuner.limit == 36
    for _ in range(100):  # 47 more of that burst, then one burst each
        tuner.throttled(in_use=1)
    assert tuner.limit == 1  # never below one


def test_successes_drain_a_throttle_burst_so_the_next_throttle_counts() -> None:
    tuner = tuner_for(maximum=64, initial=64)
    tuner.throttled(in_use=8)
    for _ in range(7):
        tuner.succeeded()
    tuner.throttled(in_use=8)
    assert tuner.limit == 36


def test_a_throttle_during_a_probe_up_goes_back_to_the_level_below_it() -> None:
    tuner = tuner_for(maximum=128, initial=40)
    tuner.throttled(in_use=1)  # the climb is over: hold at 30
    loop = ClosedLoop(tuner)
    while tuner.phase is not Phase.PROBE_UP:  # hold, then a probe up
        loop.run(flat, rounds=1)
    assert tuner.limit == 37
    tuner.throttled(in_use=37)
    assert (tuner.limit, tuner.phase) == (30, Phase.HOLD)  # not 37 x 3/4 = 27


class RateCappedS3:
    """S3 that serves ``cap`` requests/s and answers SlowDown to the share of requests beyond
    it; each request is sent at the tuner's limit of the moment (``limit / BASE_S`` per second
    attempted), each completion spaced by the rate served."""

    def __init__(self, tuner: ConcurrencyTuner, cap: float, *, seed: int = 7) -> None:
        self.tuner, self.cap = tuner, cap
        self.rng = random.Random(seed)
        self.now = 0.0

    def run(self, requests: int) -> tuple[float, float]:
        """Completions per second over the last 4/5 of the requests, and the SlowDown share."""
        served_s, completed, throttled = 0.0, 0, 0
        for number in range(requests):
            in_flight = self.tuner.limit
            attempted = in_flight / BASE_S
            rate = min(attempted, self.cap)
            if self.rng.random() < 1 - rate / attempted:
                throttled += 1
                self.tuner.throttled(in_use=in_flight)
                continue
            spacing = self.rng.uniform(0.95, 1.05) / rate
            self.now += spacing
            self.tuner.observe(BASE_S * self.rng.uniform(0.95, 1.05), self.now, in_flight)
            self.tuner.succeeded()
            if number >= requests // 5:
                completed += 1
                served_s += spacing
        return completed / served_s, throttled / requests


@pytest.mark.parametrize("cap", [150, 500, 1500, 3000])
def test_under_a_request_rate_cap_the_limit_sits_just_below_it(cap: float) -> None:
    """A probe past the cap draws a few SlowDowns and goes back to the level below it, and the
    next probe up takes half the step, so the limit closes in on the highest level that runs
    without throttles."""
    rate, slowdown_share = RateCappedS3(tuner_for(maximum=256), cap).run(requests=40_000)
    assert rate >= 0.95 * cap
    assert slowdown_share <= 0.002


def test_after_a_throttle_the_limit_grows_by_probes_not_a_fresh_climb() -> None:
    tuner = tuner_for(maximum=128, initial=64)
    tuner.throttled(in_use=64)
    limits = ClosedLoop(tuner).run(flat, rounds=30)
    assert limits[0] == 48
    rising = limits[: limits.index(128) + 1]
    steps = list(itertools.pairwise(rising))
    assert all(after <= 1.25 * before + 1 for before, after in steps)  # no doubling
    assert limits[-1] == 128  # yet probes that pay off keep going up


def test_a_limit_the_walk_does_not_fill_is_not_raised() -> None:
    tuner = tuner_for(maximum=128, initial=16)
    for number in range(20 * MIN_WINDOW_SAMPLES):
        tuner.observe(BASE_S, number * BASE_S / 4, 4)  # the walk never keeps more than 4 going
    assert tuner.limit <= 16


@pytest.mark.parametrize(("maximum", "initial"), [(1, 5), (3, 5), (10, 1)])
def test_the_ceiling_and_the_start_are_respected(maximum: int, initial: int) -> None:
    tuner = tuner_for(maximum=maximum, initial=initial)
    assert tuner.limit == min(maximum, initial)
    limits = ClosedLoop(tuner).run(flat, rounds=30)
    assert max(limits) == maximum
    assert min(limits) >= 1


def test_the_rule_is_deterministic_in_its_samples() -> None:
    runs = [
        ClosedLoop(tuner_for(maximum=256), seed=3).run(fixed_capacity(2000), rounds=80)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_a_climbs_window_lasts_a_quarter_second_at_least() -> None:
    tuner = ConcurrencyTuner(maximum=64)
    for number in range(4 * CLIMB_WINDOW_SAMPLES):  # 128 uploads in 0.127 s: one window, unjudged
        tuner.observe(BASE_S, number / 1000, tuner.limit)
    assert tuner.limit == INITIAL_TUNED_LIMIT
    tuner.observe(BASE_S, CLIMB_WINDOW_S, tuner.limit)  # a quarter second after the first
    assert tuner.limit == 2 * INITIAL_TUNED_LIMIT


def test_windows_after_the_climb_last_longer() -> None:
    tuner = ConcurrencyTuner(maximum=64, initial=64)
    tuner.throttled(in_use=0)  # the climb is over: hold at 48
    assert (tuner.limit, tuner.phase) == (48, Phase.HOLD)
    for number in range(4 * MIN_WINDOW_SAMPLES):  # 256 uploads in 0.5 s: not yet a window
        tuner.observe(BASE_S, number / 512, tuner.limit)
    assert tuner.level is None
    tuner.observe(BASE_S, MIN_WINDOW_S, tuner.limit)
    assert tuner.level is not None
    assert tuner.level.rate == pytest.approx(256 / MIN_WINDOW_S)


def _window(
    tuner: ConcurrencyTuner,
    start: float,
    rate: float,
    *,
    warm_up_rate: float | None = None,
    latency_s: float = BASE_S,
) -> float:
    """One judged window of uploads ending ``rate`` per second from ``start``, each taking
    ``latency_s``, after those still in flight from before the last change and, after a rise,
    the warm-up window (at ``warm_up_rate``, ``rate`` unless given), neither judged; when it
    ended."""
    while True:
        warming_up = tuner._warming_up
        floor = CLIMB_WINDOW_SAMPLES if tuner.phase is Phase.CLIMB else MIN_WINDOW_SAMPLES
        samples = tuner._stale_samples + max(floor, tuner.limit)
        pace = (warm_up_rate or rate) if warming_up else rate
        for number in range(samples):
            tuner.observe(latency_s, start + number / pace, tuner.limit)
        start += samples / pace + 1
        if not warming_up:
            return start


def _hold_until_probe(tuner: ConcurrencyTuner, start: float, rate: float) -> tuple[float, int]:
    """Windows at ``rate`` until the tuner probes; when the last ended and how many there were."""
    windows = 0
    while tuner.phase is Phase.HOLD:
        start = _window(tuner, start, rate)
        windows += 1
    return start, windows


def test_a_doubling_that_seems_not_to_pay_is_measured_again_before_it_is_given_up() -> None:
    kept = tuner_for(maximum=64, initial=8)
    now = _window(kept, 0.0, rate=400)  # 8 in flight: 400/s
    assert kept.limit == 16
    now = _window(kept, now, rate=404)  # 16: a noisy short window, 1 % more
    assert (kept.limit, kept.phase) == (16, Phase.CONFIRM)
    now = _window(kept, now, rate=600)  # 16 over a long window
    assert (kept.limit, kept.phase) == (8, Phase.RECHECK)
    _window(kept, now, rate=400)  # 8 over a long window: 16 does pay, and the climb goes on
    assert (kept.limit, kept.phase, kept.accepted) == (32, Phase.CLIMB, 16)

    given_up = tuner_for(maximum=64, initial=8)
    now = _window(given_up, 0.0, rate=400)
    now = _window(given_up, now, rate=390)
    now = _window(given_up, now, rate=410)  # 16 over a long window
    _window(given_up, now, rate=400)  # 8 over a long window: 16 brings under 5 % more
    assert (given_up.limit, given_up.phase) == (8, Phase.HOLD)

    at_the_ceiling = tuner_for(maximum=16, initial=8)
    now = _window(at_the_ceiling, 0.0, rate=400)
    now = _window(at_the_ceiling, now, rate=400)
    now = _window(at_the_ceiling, now, rate=700)
    _window(at_the_ceiling, now, rate=400)  # 16 pays and is the ceiling: it is held
    assert (at_the_ceiling.limit, at_the_ceiling.phase) == (16, Phase.HOLD)


def test_the_window_after_a_rise_is_dropped_not_judged() -> None:
    """The first uploads through new slots open connections: a doubling judged on them would
    seem not to pay."""
    tuner = tuner_for(maximum=64, initial=8)
    now = _window(tuner, 0.0, rate=400)
    assert (tuner.limit, tuner._warming_up) == (16, True)
    now = _window(tuner, now, rate=700, warm_up_rate=200)  # a slow warm-up, then the level
    assert (tuner.limit, tuner.phase, tuner.accepted) == (32, Phase.CLIMB, 16)


def test_a_refused_probe_keeps_the_levels_windows_and_waits_twice_as_long_for_the_next() -> None:
    tuner = tuner_for(maximum=64, initial=64)
    tuner.throttled(in_use=0)  # hold at 48
    now, windows = _hold_until_probe(tuner, 0.0, rate=1000)
    assert (windows, tuner.phase, tuner.limit) == (HOLD_WINDOWS, Phase.PROBE_UP, 60)
    now = _window(tuner, now, rate=1010)  # 1 % more: refused
    assert (tuner.limit, tuner.phase) == (48, Phase.HOLD)
    assert len(tuner._hold) == HOLD_WINDOWS  # the level's windows still count
    now, windows = _hold_until_probe(tuner, now, rate=1000)
    assert windows == 2 * HOLD_WINDOWS
    _window(tuner, now, rate=1100)  # 10 % more: kept, and the next hold is short again
    assert (tuner.accepted, tuner._hold_windows) == (60, HOLD_WINDOWS)


def test_futile_probes_at_the_ceiling_grow_rare() -> None:
    """At the ceiling with a rate that grows with the limit, probes down never pay: each one
    doubles the wait for the next, up to ``MAX_HOLD_WINDOWS``."""
    tuner = tuner_for(maximum=64, initial=64)
    limits = ClosedLoop(tuner).run(flat, rounds=400)
    assert limits[-1] == 64
    assert tuner._hold_windows == MAX_HOLD_WINDOWS
    assert limits.count(64) >= 0.95 * len(limits)


def test_a_throttled_probe_up_halves_the_next_probes_step_and_one_that_pays_doubles_it() -> None:
    tuner = tuner_for(maximum=256, initial=64)
    tuner.throttled(in_use=0)  # hold at 48
    now, _ = _hold_until_probe(tuner, 0.0, rate=1000)
    assert tuner.limit == 60  # 1.25x
    tuner.throttled(in_use=60)
    assert (tuner.limit, tuner.phase) == (48, Phase.HOLD)
    now, _ = _hold_until_probe(tuner, now, rate=1000)
    assert tuner.limit == 54  # 1.125x: the cap lies between 48 and 60
    _window(tuner, now, rate=1100)  # 54 pays: the next step is twice as big again
    assert (tuner.limit, tuner.phase) == (67, Phase.PROBE_UP)


# Every row of the transition table, reached the way a run reaches it. A tuner in each phase:
# ``start`` functions return it with the time its last window ended.
Start = Callable[[], tuple[ConcurrencyTuner, float]]
LEVEL_RATE = 1000.0  # the held level's rate in the hold, probe and alarm rows


def _started(maximum: int = 64, initial: int = 8) -> tuple[ConcurrencyTuner, float]:
    return tuner_for(maximum=maximum, initial=initial), 0.0


def _climbing() -> tuple[ConcurrencyTuner, float]:
    """At 16 after the first window (8 in flight, 400/s)."""
    tuner, now = _started()
    return tuner, _window(tuner, now, rate=400)


def _confirming() -> tuple[ConcurrencyTuner, float]:
    """At 16, whose short window brought 1 % more."""
    tuner, now = _climbing()
    return tuner, _window(tuner, now, rate=404)


def _rechecking(maximum: int = 64, doubled_rate: float = 600) -> Start:
    """Back at 8 after 16's long window at ``doubled_rate``."""

    def start() -> tuple[ConcurrencyTuner, float]:
        tuner, now = _started(maximum)
        for rate in (400, 404, doubled_rate):
            now = _window(tuner, now, rate=rate)
        return tuner, now

    return start


def _holding(windows: int = 0) -> Start:
    """At 48 (a throttle ended the climb at its start, 64), after ``windows`` at
    ``LEVEL_RATE``."""

    def start() -> tuple[ConcurrencyTuner, float]:
        tuner, now = _started(maximum=128, initial=64)
        tuner.throttled(in_use=0)
        for _ in range(windows):
            now = _window(tuner, now, rate=LEVEL_RATE)
        return tuner, now

    return start


def _probing_up() -> tuple[ConcurrencyTuner, float]:
    """At 60 (48 x 1.25), after the hold."""
    return _holding(HOLD_WINDOWS)()


def _before_a_probe_down() -> tuple[ConcurrencyTuner, float]:
    """At 48, one window short of the third probe (two refused probes up made the hold 4x)."""
    tuner, now = _probing_up()
    now = _window(tuner, now, rate=1.01 * LEVEL_RATE)
    now, _ = _hold_until_probe(tuner, now, rate=LEVEL_RATE)
    now = _window(tuner, now, rate=1.01 * LEVEL_RATE)
    for _ in range(4 * HOLD_WINDOWS - 1):
        now = _window(tuner, now, rate=LEVEL_RATE)
    return tuner, now


def _probing_down() -> tuple[ConcurrencyTuner, float]:
    """At 36 (48 x 3/4)."""
    tuner, now = _before_a_probe_down()
    return tuner, _window(tuner, now, rate=LEVEL_RATE)


def _alarmed() -> tuple[ConcurrencyTuner, float]:
    """At 24, after a window at 48 with thrice the latency."""
    tuner, now = _holding(2)()
    return tuner, _window(tuner, now, rate=LEVEL_RATE, latency_s=3 * BASE_S)


def _at(rate: float, latency_s: float = BASE_S) -> Callable[[ConcurrencyTuner, float], object]:
    """One judged window at ``rate``."""
    return lambda tuner, now: _window(tuner, now, rate=rate, latency_s=latency_s)


def _throttle(tuner: ConcurrencyTuner, _now: float) -> None:
    tuner.throttled(in_use=0)


@dataclass(frozen=True)
class Row:
    """How a row is reached: a tuner in its phase, the event it classifies as the row's
    outcome, and the estimate after."""

    start: Start
    event: Callable[[ConcurrencyTuner, float], object]
    estimate: float


ROWS: dict[tuple[Phase, Outcome], Row] = {
    (Phase.CLIMB, Outcome.FIRST): Row(_started, _at(400), 16),
    (Phase.CLIMB, Outcome.PAID): Row(_climbing, _at(800), 32),
    (Phase.CLIMB, Outcome.NOT_PAID): Row(_climbing, _at(404), 16),
    (Phase.CLIMB, Outcome.THROTTLED_RISE): Row(_climbing, _throttle, 8),
    (Phase.CLIMB, Outcome.THROTTLED): Row(_started, _throttle, 6),
    (Phase.CONFIRM, Outcome.MEASURED): Row(_confirming, _at(600), 8),
    (Phase.CONFIRM, Outcome.THROTTLED): Row(_confirming, _throttle, 12),
    (Phase.RECHECK, Outcome.KEPT): Row(_rechecking(), _at(400), 32),
    (Phase.RECHECK, Outcome.KEPT_AT_CEILING): Row(_rechecking(maximum=16), _at(400), 16),
    (Phase.RECHECK, Outcome.REFUSED): Row(_rechecking(doubled_rate=410), _at(400), 8),
    (Phase.RECHECK, Outcome.THROTTLED): Row(_rechecking(), _throttle, 6),
    (Phase.HOLD, Outcome.HELD): Row(_holding(), _at(LEVEL_RATE), 48),
    (Phase.HOLD, Outcome.LATENCY_JUMP): Row(_holding(2), _at(LEVEL_RATE, 3 * BASE_S), 24),
    (Phase.HOLD, Outcome.PROBE_UP_DUE): Row(_holding(HOLD_WINDOWS - 1), _at(LEVEL_RATE), 60),
    (Phase.HOLD, Outcome.PROBE_DOWN_DUE): Row(_before_a_probe_down, _at(LEVEL_RATE), 36),
    (Phase.HOLD, Outcome.THROTTLED): Row(_holding(), _throttle, 36),
    (Phase.PROBE_UP, Outcome.PAID): Row(_probing_up, _at(1.1 * LEVEL_RATE), 75),
    (Phase.PROBE_UP, Outcome.NOT_PAID): Row(_probing_up, _at(1.01 * LEVEL_RATE), 48),
    (Phase.PROBE_UP, Outcome.THROTTLED_RISE): Row(_probing_up, _throttle, 48),
    (Phase.PROBE_DOWN, Outcome.PAID): Row(_probing_down, _at(1.05 * LEVEL_RATE), 36),
    (Phase.PROBE_DOWN, Outcome.NOT_PAID): Row(_probing_down, _at(0.9 * LEVEL_RATE), 48),
    (Phase.PROBE_DOWN, Outcome.THROTTLED): Row(_probing_down, _throttle, 27),
    (Phase.ALARM, Outcome.PAID): Row(_alarmed, _at(0.99 * LEVEL_RATE), 12),
    (Phase.ALARM, Outcome.NOT_PAID): Row(_alarmed, _at(0.5 * LEVEL_RATE), 48),
    (Phase.ALARM, Outcome.THROTTLED): Row(_alarmed, _throttle, 18),
}


def test_every_row_of_the_transition_table_has_a_case_here() -> None:
    assert ROWS.keys() == TRANSITIONS.keys()


@pytest.mark.parametrize(
    ("key", "transition"),
    TRANSITIONS.items(),
    ids=[f"{phase}-{outcome}" for phase, outcome in TRANSITIONS],
)
def test_each_row_of_the_transition_table_is_the_one_its_event_takes(
    key: tuple[Phase, Outcome], transition: Transition, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = ROWS[key]
    tuner, now = row.start()
    assert tuner.phase is key[0]
    applied: list[Transition] = []
    apply = tuner._apply

    def spy(transition: Transition, in_use: int, *, used: bool = True) -> None:
        applied.append(transition)
        apply(transition, in_use, used=used)

    monkeypatch.setattr(tuner, "_apply", spy)
    row.event(tuner, now)
    assert applied == [transition]  # the event was classified as the row's outcome
    assert (tuner.phase, tuner.estimate) == (transition.phase, row.estimate)


def test_a_maximum_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        TunedLimit(0)


async def test_tuned_limit_hands_new_slots_to_waiters_when_it_grows() -> None:
    limit = TunedLimit(maximum=8, initial=1)
    await limit.acquire()
    waiters = [asyncio.create_task(limit.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert limit.in_use == 1
    for number in range(MIN_WINDOW_SAMPLES):  # one window at one slot: the climb doubles it
        limit.record_latency(BASE_S, ended_at=number * MIN_WINDOW_S / (MIN_WINDOW_SAMPLES - 2))
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
