"""The resume rule, pure: which position is safe to resume from while uploads run out of order.

Rows are dispatched in the walk's order (key order by default, ``(created_at, key)`` descending
with ``--backfill-order newest-first``) and finish in any order. ``CheckpointTracker`` numbers
each dispatch and keeps the *low-water mark*: the last position such that it and every position
dispatched before it have finished, so resuming after it loses nothing and redoes at most the
uploads that were in flight. ``checkpoint_timestamp`` is that mark's ``created_at`` plus one
microsecond (Postgres' resolution), so rows tied on it are listed again, never skipped; it is only
meaningful for a newest-first walk (``CacheBackfill`` keeps the cutoff in key order). Nothing to
shut down: the state is in memory and the progress store saves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

POSTGRES_TICK = timedelta(microseconds=1)


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A row's place in a walk; compares as (created_at, key)."""

    created_at: datetime
    key: str


def resume_cutoff(cutoff: datetime, low_water: Position | None) -> datetime:
    """A ``created_at < …`` bound that still includes every row not yet known to be done."""
    if low_water is None:
        return cutoff
    return min(cutoff, low_water.created_at + POSTGRES_TICK)


class CheckpointTracker:
    """Tracks dispatched and finished rows; all methods are O(1) amortized and synchronous."""

    def __init__(self, cutoff: datetime, *, low_water: Position | None = None) -> None:
        self.cutoff = cutoff
        self._positions: dict[int, Position] = {}
        self._finished: set[int] = set()
        self._next_sequence = 0
        self._low_sequence = 0  # the first sequence number not yet known finished
        self._low_water = low_water  # a resumed run starts from the saved position

    def dispatch(self, position: Position) -> int:
        """Record a row handed to an upload; returns its sequence number."""
        sequence = self._next_sequence
        self._next_sequence += 1
        self._positions[sequence] = position
        return sequence

    def finish(self, sequence: int) -> None:
        """Record that a dispatched row is done (uploaded, skipped or vanished)."""
        if sequence not in self._positions or sequence in self._finished:
            raise ValueError(f"sequence {sequence} is not in flight")
        self._finished.add(sequence)
        while self._low_sequence in self._finished:
            self._finished.remove(self._low_sequence)
            self._low_water = self._positions.pop(self._low_sequence)
            self._low_sequence += 1

    @property
    def finished_in_order(self) -> int:
        """Rows of this run up to and including the low-water mark: the ones a resume will not
        walk again (rows finished beyond it are walked, and counted, again)."""
        return self._low_sequence

    @property
    def in_flight(self) -> int:
        """Rows dispatched and not finished."""
        return len(self._positions) - len(self._finished)

    @property
    def low_water(self) -> Position | None:
        """The last position that, with everything before it, has finished."""
        return self._low_water

    @property
    def checkpoint_timestamp(self) -> datetime:
        """The cutoff to resume from without loss."""
        return resume_cutoff(self.cutoff, self._low_water)
