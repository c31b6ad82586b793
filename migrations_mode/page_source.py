"""The rows one cache's backfill walks, page by page, and what S3 holds for them.

``PageSource.pages(start)`` lists the table in walk order (``--backfill-order``: the primary
key, one index range scan per page, or newest first) from after ``start``, within the shard's
key range, each page ``key_batch_size`` rows (with each value's MD5 when the row action compares
content); the last page is the first shorter one. ``stored_objects(rows)`` says what S3 holds
for a page's rows: in key order from one listing of the bucket walked alongside the table
(``BucketIndex``: a request per 1,000 objects), in newest-first order ``UNKNOWN`` (each row is
HEADed later). Listed objects in the page's span that no row of the table accounts for are
*extra*: a verification reports them (``DifferenceReport``) and counts them. Every call goes
through the cache's ``StorageCaller``. Nothing here holds a connection of its own; a page source
serves one walk, and is done with it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from functools import partial

from layer_cache.keys import key_levels
from layer_cache.pg import PgLayer, RowRef
from layer_cache.s3 import S3Layer, StoredObject
from migrations_mode.bucket_index import UNKNOWN, BucketIndex, Stored
from migrations_mode.checkpoint import Position
from migrations_mode.config import BackfillConfig
from migrations_mode.differences import Difference, DifferenceKind, DifferenceReport
from migrations_mode.progress import CacheProgress
from migrations_mode.progress_store import S3_PROGRESS_PREFIX
from migrations_mode.storage_caller import StorageCall
from migrations_mode.walk import WalkOrder


@dataclass(frozen=True, slots=True)
class Page:
    """One page of rows in walk order; ``last`` when no page follows it."""

    rows: list[RowRef]
    last: bool


@dataclass(frozen=True, slots=True)
class ExtraObjects:
    """Where objects without a row are reported (a verification's report and counts)."""

    report: DifferenceReport
    progress: CacheProgress


@dataclass(kw_only=True)
class PageSource:
    """One cache's rows below the cutoff in walk order, and what its bucket holds for them."""

    pg: PgLayer
    s3: S3Layer
    config: BackfillConfig
    storage: StorageCall
    with_md5: bool
    extra: ExtraObjects | None  # None: objects without a row are not looked for
    _bucket_index: BucketIndex | None = field(default=None, init=False, repr=False)

    @property
    def in_key_order(self) -> bool:
        """Rows come by primary key (so the bucket listing can be walked alongside)."""
        return self.config.order is WalkOrder.KEY

    async def pages(self, start: Position | None) -> AsyncGenerator[Page, None]:
        """Pages after ``start`` (None: from the shard's beginning) until the last one."""
        if self.in_key_order:
            self._bucket_index = self._new_bucket_index(start)
        cursor = start
        limit = self.config.key_batch_size
        while True:
            rows = await self._list(cursor, limit)
            if rows:
                cursor = Position(rows[-1].created_at, rows[-1].key)
            last = len(rows) < limit
            yield Page(rows, last)
            if last:
                return

    async def stored_objects(self, rows: Sequence[RowRef]) -> list[Stored]:
        """What S3 holds for each row: the object, None, or ``UNKNOWN`` (HEAD it)."""
        index = self._bucket_index
        if index is None:
            return [UNKNOWN] * len(rows)
        object_keys = [self.s3.object_key(row.key) for row in rows]
        found, unmatched = await self.storage(lambda: index.objects_for(object_keys))
        if self.extra is not None and unmatched:
            await self._report_extra(unmatched)
        return found

    async def _list(self, cursor: Position | None, limit: int) -> list[RowRef]:
        """The page after ``cursor``: the walk order picks the query and the cursor's form (a
        key, or a position); the bounds are the same."""
        if self.in_key_order:
            query = partial(self.pg.list_by_key, after=cursor.key if cursor else None)
        else:
            after = (cursor.created_at, cursor.key) if cursor else None
            query = partial(self.pg.list_newest_first, after=after)
        key_range = self.config.shard.key_range
        return await self.storage(
            lambda: query(
                cutoff=self.config.cutoff,
                low=key_range.low,
                high=key_range.high,
                limit=limit,
                with_md5=self.with_md5,
            )
        )

    def _new_bucket_index(self, resume_after: Position | None) -> BucketIndex:
        key_range = self.config.shard.key_range
        if resume_after is not None:
            start_after: str | None = self.s3.object_key(resume_after.key)
        else:
            start_after = self._level_prefix(key_range.low)
        return BucketIndex(
            self.s3.list_page,
            start_after=start_after,
            stop_at=self._level_prefix(key_range.high),
        )

    def _level_prefix(self, key: str | None) -> str | None:
        """The object-key prefix every key starting with ``key`` sorts after (or None)."""
        if key is None:
            return None
        levels = "/".join(key_levels(key))
        return f"{self.s3.key_prefix}/{levels}" if self.s3.key_prefix else levels

    async def _report_extra(self, listed: list[tuple[str, StoredObject]]) -> None:
        """Objects in the walked range that no row of the table accounts for."""
        assert self.extra is not None
        by_row_key = {
            object_key.rsplit("/", 1)[-1]: (object_key, stored)
            for object_key, stored in listed
            if S3_PROGRESS_PREFIX not in object_key
        }
        if not by_row_key:
            return
        existing = await self.storage(lambda: self.pg.existing_keys(list(by_row_key)))
        extra = [(key, found) for key, found in by_row_key.items() if key not in existing]
        for key, (object_key, stored) in extra:
            self.extra.report.record(
                Difference(
                    self.pg.spec.cache_type,
                    key,
                    object_key,
                    DifferenceKind.EXTRA,
                    object_size=stored.size,
                    object_etag=stored.etag,
                )
            )
        self.extra.progress.extra(len(extra))
