"""Loading and saving one cache's backfill progress (a copy's only; a verification records nothing).

``load`` returns the record to resume from (none with ``--backfill-restart``, and a warning when
records exist only under other parameters). While the cache runs, ``finished`` wakes the
``save_when_due`` loop each time another batch of rows has finished in order since the last
save was taken; a failed save is a warning, never a failure (it costs re-work, not data).
Shutdown: the cache cancels the loop, then ``final_save`` writes the last position, shielded
from cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from migrations_mode.checkpoint import Position
from migrations_mode.errors import CacheBackfillFailed
from migrations_mode.progress_store import ProgressKey, ProgressStore, SavedProgress, unused_records
from migrations_mode.row_action import StorageCall

log = structlog.get_logger(__name__)

# What to save now, and ``finished_in_order`` at that moment.
Snapshot = Callable[[], tuple[SavedProgress, int]]


class ProgressSaver:
    """Saves a cache's progress under its key each time a batch's worth has finished in order."""

    def __init__(
        self,
        store: ProgressStore,
        key: ProgressKey,
        *,
        snapshot: Snapshot,
        storage_call: StorageCall,
        writes: bool,
        restart: bool,
        batch_size: int,
    ) -> None:
        self.store = store
        self.key = key
        self._snapshot = snapshot
        self._storage_call = storage_call
        self._writes = writes
        self._restart = restart
        self._batch_size = batch_size
        self._saved_position: Position | None = None
        self._saved_at = 0  # finished_in_order at the last save
        self._save_due = asyncio.Event()

    async def load(self) -> SavedProgress | None:
        """The saved progress to resume from, or None to start from the beginning."""
        if not self._writes:
            return None  # a verification walks everything and records nothing
        if self._restart:
            log.info("ignoring saved progress (--backfill-restart)")
            return None
        saved = await self._storage_call(lambda: self.store.load(self.key))
        if saved is None:
            await self._report_unused_records()
            return None
        self._saved_position = saved.position
        return saved

    async def _report_unused_records(self) -> None:
        """One log line when progress for this cache and cutoff exists only under other
        parameters: it is not used (its position means nothing for this walk)."""
        key = self.key
        others = await self._storage_call(lambda: self.store.others(key))
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
        if finished_in_order - self._saved_at >= self._batch_size:
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
        if not self._writes:
            return
        record, finished_in_order = self._snapshot()
        if record.position == self._saved_position and not record.completed:
            return
        # Counted from this snapshot while it is written, so rows finishing meanwhile do not
        # ask for another save at once; a failed save gives the count back.
        previous, self._saved_at = self._saved_at, finished_in_order
        try:
            await self._storage_call(lambda: self.store.save(self.key, record))
        except CacheBackfillFailed as exc:
            # Losing a save costs re-work on the next run, never data: carry on.
            log.warning("could not save backfill progress", error=str(exc.cause))
            self._saved_at = previous
            return
        self._saved_position = record.position
