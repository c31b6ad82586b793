"""Loading and saving one cache's backfill progress (a copy's and a repair's; a verification
records nothing).

``WalkProgress`` is where the walk stands (the checkpoint tracker, whether it completed, the rows
earlier runs finished): the pipeline moves it, the saver records it. ``resume`` takes up the
saved record into it (none with ``--backfill-restart``, and a warning when records exist only
under other parameters; a completed repair is a fresh pass); ``checkpoint_timestamp`` is the
cutoff a resume starts from, which the events quote. While the cache runs, ``finished``
wakes the ``save_when_due`` loop each time another batch of rows has finished in order since the
last save was taken; a failed save is a warning, never a failure (it costs re-work, not data).
Shutdown: the cache cancels the loop, then ``final_save`` writes the last position, shielded
from cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime

import structlog

from layer_cache.errors import CacheBackfillFailed
from migrations_mode.checkpoint import CheckpointTracker, Position
from migrations_mode.config import format_checkpoint
from migrations_mode.progress_store import (
    ProgressKey,
    ProgressStore,
    SavedProgress,
    WalkPurpose,
    unused_records,
)
from migrations_mode.storage_caller import StorageCall
from migrations_mode.walk import WalkOrder

log = structlog.get_logger(__name__)


@dataclass
class WalkProgress:
    """Where one cache's walk stands: the checkpoint tracker, whether the walk completed, and
    the rows the runs it resumed finished. The pipeline moves it; the saver records it."""

    tracker: CheckpointTracker
    completed: bool = False
    rows_done_earlier: int = 0

    @property
    def rows_done(self) -> int:
        """Rows finished in walk order, this run and the runs it resumed (rows finished out of
        order count once the rows before them are done, so a resume never counts a row twice)."""
        return self.rows_done_earlier + self.tracker.finished_in_order

    def snapshot(self) -> tuple[SavedProgress, int]:
        """What to save now, and ``finished_in_order`` at that moment."""
        record = SavedProgress(self.tracker.low_water, self.completed, self.rows_done)
        return record, self.tracker.finished_in_order


@dataclass
class ProgressSaver:
    """Saves a cache's progress under its key each time a batch's worth has finished in order."""

    store: ProgressStore
    key: ProgressKey
    _: KW_ONLY
    walk: WalkProgress
    storage: StorageCall
    writes: bool
    restart: bool
    batch_size: int
    _saved_position: Position | None = field(default=None, init=False)
    _saved_at: int = field(default=0, init=False)  # finished_in_order at the last save
    _save_due: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    @property
    def checkpoint_timestamp(self) -> datetime:
        """The cutoff that resumes the walk without loss. In key order any row may still be
        pending whatever its timestamp: the cutoff resumes it (with the saved key position);
        newest first, the tracker's checkpoint does."""
        if self.key.order is WalkOrder.KEY:
            return self.key.cutoff
        return self.walk.tracker.checkpoint_timestamp

    async def load(self) -> SavedProgress | None:
        """The saved progress to resume from, or None to start from the beginning."""
        if not self.writes:
            return None  # a verification walks everything and records nothing
        if self.restart:
            log.info("ignoring saved progress (--backfill-restart)")
            return None
        saved = await self.storage(lambda: self.store.load(self.key))
        if saved is None:
            await self._report_unused_records()
            return None
        self._saved_position = saved.position
        return saved

    async def resume(self) -> Position | None:
        """Take up the saved progress, if any, into the walk; the position it starts after. A
        repair that completed is a fresh pass (only one cut short resumes)."""
        saved = await self.load()
        if saved is None:
            return None
        if saved.completed and self.key.purpose is WalkPurpose.REPAIR:
            log.info("previous repair pass completed; starting a new pass")
            return None
        walk = self.walk
        walk.completed = saved.completed
        walk.rows_done_earlier = saved.rows_done
        if saved.position is not None:
            walk.tracker = CheckpointTracker(self.key.cutoff, low_water=saved.position)
            log.info(
                "resuming from saved progress",
                progress_store=self.store.kind,
                checkpoint_timestamp=format_checkpoint(self.checkpoint_timestamp),
                rows_done_earlier_runs=saved.rows_done,
            )
        return saved.position

    async def _report_unused_records(self) -> None:
        """One log line when progress for this cache and cutoff exists only under other
        parameters: it is not used (its position means nothing for this walk)."""
        key = self.key
        others = await self.storage(lambda: self.store.others(key))
        unused = unused_records(key.identity, others)
        if not unused:
            return
        closest, differs = unused[0]
        log.warning(
            "saved progress not used: it was saved for other parameters",
            differs=differs,
            order=key.order.value,
            saved_order=closest.order or "unknown (saved by an earlier version)",
            target=key.target,
            saved_target=closest.target or "unknown (saved by an earlier version)",
            shard=key.shard,
            saved_shard=closest.shard,
            records_not_used=len(unused),
            progress_store=self.store.kind,
        )

    def finished(self, finished_in_order: int) -> None:
        """A row is done; wake the saver once a batch of rows has finished in order since the
        last save was taken. A kill then redoes at most that batch, the rows that finished
        while the next save was being written (about one upload's time: up to the uploads in
        flight) and the uploads in flight, so one batch plus twice the uploads in flight."""
        if finished_in_order - self._saved_at >= self.batch_size:
            self._save_due.set()

    async def save_when_due(self) -> None:
        """Save each time ``finished`` says a batch's worth is done; runs until cancelled."""
        while True:
            await self._save_due.wait()
            self._save_due.clear()
            await self.save()

    async def final_save(self) -> None:
        """Save once more; runs to the end even when the caller is being cancelled."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self.save())

    async def save(self) -> None:
        """Save the current progress unless it says nothing new."""
        if not self.writes:
            return
        record, finished_in_order = self.walk.snapshot()
        if record.position == self._saved_position and not record.completed:
            return
        # Counted from this snapshot while it is written, so rows finishing meanwhile do not
        # ask for another save at once; a failed save gives the count back.
        previous, self._saved_at = self._saved_at, finished_in_order
        try:
            await self.storage(lambda: self.store.save(self.key, record))
        except CacheBackfillFailed as exc:
            # Losing a save costs re-work on the next run, never data: carry on.
            log.warning("could not save backfill progress", error=str(exc.cause))
            self._saved_at = previous
            return
        self._saved_position = record.position
