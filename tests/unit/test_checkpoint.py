from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrations_mode.checkpoint import POSTGRES_TICK, CheckpointTracker, Position, resume_cutoff

CUTOFF = datetime(2026, 1, 13, 17, 30, 26, tzinfo=UTC)


def at(offset_us: int, key: str) -> Position:
    return Position(CUTOFF - timedelta(microseconds=offset_us), key)


def test_checkpoint_is_the_cutoff_until_the_first_row_finishes() -> None:
    tracker = CheckpointTracker(CUTOFF)
    tracker.dispatch(at(10, "b"))
    assert tracker.checkpoint_timestamp == CUTOFF
    assert tracker.in_flight == 1


def test_checkpoint_waits_for_the_oldest_dispatched_unfinished_row() -> None:
    tracker = CheckpointTracker(CUTOFF)
    first = tracker.dispatch(at(10, "b"))
    second = tracker.dispatch(at(20, "a"))
    tracker.finish(second)  # out of order: the first is still in flight
    assert tracker.low_water is None
    tracker.finish(first)
    assert tracker.low_water == at(20, "a")
    assert tracker.checkpoint_timestamp == at(20, "a").created_at + POSTGRES_TICK


def test_finishing_twice_is_a_bug() -> None:
    tracker = CheckpointTracker(CUTOFF)
    sequence = tracker.dispatch(at(1, "a"))
    tracker.finish(sequence)
    with pytest.raises(ValueError, match="not in flight"):
        tracker.finish(sequence)


def test_resume_cutoff_never_exceeds_the_original_cutoff() -> None:
    assert resume_cutoff(CUTOFF, Position(CUTOFF, "a")) == CUTOFF


def list_page(
    rows: list[Position], cutoff: datetime, after: Position | None, limit: int
) -> list[Position]:
    """The listing query, modelled: created_at < cutoff, (created_at, key) desc, after a cursor."""
    eligible = [r for r in rows if r.created_at < cutoff and (after is None or r < after)]
    return sorted(eligible, reverse=True)[:limit]


@settings(max_examples=300, deadline=None)
@given(
    timestamps=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=60),
    batch_size=st.integers(min_value=1, max_value=9),
    concurrency=st.integers(min_value=1, max_value=6),
    stop_after=st.integers(min_value=0, max_value=80),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_no_row_is_lost_whatever_the_ties_batch_size_and_interruption(
    timestamps: list[int], batch_size: int, concurrency: int, stop_after: int, seed: int
) -> None:
    """Run the paging + tracker model, stop anywhere, resume from the checkpoint: nothing lost."""
    rng = random.Random(seed)
    rows = [at(offset, f"{index:04x}") for index, offset in enumerate(timestamps)]
    tracker = CheckpointTracker(CUTOFF)
    finished: set[Position] = set()
    in_flight: list[tuple[int, Position]] = []
    after: Position | None = None
    steps = 0
    while steps < stop_after:
        page = list_page(rows, CUTOFF, after, batch_size)
        if not page:
            break
        for row in page:
            if len(in_flight) == concurrency:  # wait for a random upload to finish
                sequence, done = in_flight.pop(rng.randrange(len(in_flight)))
                tracker.finish(sequence)
                finished.add(done)
            in_flight.append((tracker.dispatch(row), row))
            steps += 1
        after = page[-1]
    # Interrupted here: whatever is in flight is lost with the process.
    resumed = list_page(rows, tracker.checkpoint_timestamp, None, len(rows))
    assert set(rows) <= finished | set(resumed)
    # Everything newer than the checkpoint really is finished: resuming redoes no newer row.
    assert all(r in finished for r in rows if r.created_at >= tracker.checkpoint_timestamp)
