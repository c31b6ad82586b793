"""The resume rule, pure: which position is safe to resume from while uploads run out of order.

Rows are dispatched in one total order (newest first: ``(created_at, key)`` descending) and
finish in any order. ``CheckpointTracker`` numbers each dispatch and keeps the *low-water mark*:
the last position such that it and every position dispatched before it have finished. Resuming
strictly after that position loses nothing and redoes at most the rows that finished out of
order, which is bounded by the uploads in flight.

``checkpoint_timestamp`` turns the low-water mark into a cutoff an operator can paste back
(``created_at < cutoff``). Ties on ``created_at`` are common after bulk copies, so the cutoff is
the mark's ``created_at`` plus one microsecond (Postgres' resolution): every row sharing that
timestamp is listed again rather than skipped. Re-listed rows that are already in S3 are skipped
by the size check, so the cost of a tie is a HEAD, never a hole.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

POSTGRES_TICK = timedelta(microseconds=1)


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A row's place in newest-first order; compares as (created_at, key)."""

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
