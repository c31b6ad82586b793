"""What is already in the bucket, from one ordered listing instead of a HEAD per row.

In key order, rows and their object keys (``ab/cd/ef/<key>``) sort the same way, so the job walks
the listing alongside the table like a merge join: ``BucketIndex.objects_for(page)`` extends the
listing past the page's largest object key and answers each row's stored object (size and ETag),
or None when absent (an empty bucket costs one request in all; a full one, one per 1,000 rows).
Correctness never depends on the order matching: a row whose object key lies before what the
listing has passed (short keys, another collation) is *unknown* and the caller HEADs it, and an
object written behind the listing (live DualWrite) is reported absent and PUT again with the
same bytes. ``ListingWindow`` is the pure part; ``BucketIndex`` adds the paging and holds no
connection of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, Literal

from layer_cache.s3 import StoredObject


class Unknown(Enum):
    """The listing cannot tell whether the object exists: HEAD it."""

    UNKNOWN = "unknown"


UNKNOWN: Final = Unknown.UNKNOWN
Stored = StoredObject | None | Literal[Unknown.UNKNOWN]
"""What S3 holds for a row: the object, nothing (None), or ``UNKNOWN``."""

ListPage = Callable[
    [str | None, str | None], Awaitable[tuple[list[tuple[str, StoredObject]], str | None]]
]


@dataclass
class ListingWindow:
    """Listed objects not yet matched, by object key, and how far the listing has got."""

    start_after: str | None = None
    entries: dict[str, StoredObject] = field(default_factory=dict)
    listed_up_to: str | None = None  # the last object key listed so far
    exhausted: bool = False
    consumed_up_to: str | None = None  # entries at or before this were dropped

    def covers(self, object_key: str) -> bool:
        """True once the listing has passed ``object_key`` (or has nothing more)."""
        return self.exhausted or (self.listed_up_to is not None and self.listed_up_to >= object_key)

    def add(self, entries: Sequence[tuple[str, StoredObject]], *, exhausted: bool) -> None:
        """Take in one listing page."""
        for key, stored in entries:
            self.entries[key] = stored
        if entries:
            self.listed_up_to = entries[-1][0]
        self.exhausted = exhausted

    def stored(self, object_key: str) -> Stored:
        """The stored object, None when absent, ``UNKNOWN`` when the window cannot tell."""
        if self.consumed_up_to is not None and object_key <= self.consumed_up_to:
            return UNKNOWN
        if object_key in self.entries:
            return self.entries[object_key]
        return None if self.covers(object_key) else UNKNOWN

    def drop_through(self, object_key: str) -> list[tuple[str, StoredObject]]:
        """Forget entries up to ``object_key``; returns them, in key order."""
        dropped = sorted(key for key in self.entries if key <= object_key)
        entries = [(key, self.entries.pop(key)) for key in dropped]
        if self.consumed_up_to is None or object_key > self.consumed_up_to:
            self.consumed_up_to = object_key
        return entries


class BucketIndex:
    """Pages through a bucket in key order on demand, for pages of rows in the same order."""

    def __init__(
        self, list_page: ListPage, *, start_after: str | None, stop_at: str | None
    ) -> None:
        self._list_page = list_page
        self._window = ListingWindow(start_after=start_after)
        self._token: str | None = None
        self._stop_at = stop_at  # listing beyond this object key is not needed (shard end)
        self.requests = 0

    async def objects_for(
        self, object_keys: Sequence[str]
    ) -> tuple[list[Stored], list[tuple[str, StoredObject]]]:
        """What is stored for a page's object keys (None absent, ``UNKNOWN`` unknown), and the
        listed objects within the page's span that matched no row (candidates for *extra*)."""
        if not object_keys:
            return [], []
        highest = max(object_keys)
        while not self._window.covers(highest):
            await self._fetch_next()
        found = [self._window.stored(key) for key in object_keys]
        matched = set(object_keys)
        unmatched = [
            entry for entry in self._window.drop_through(highest) if entry[0] not in matched
        ]
        return found, unmatched

    async def _fetch_next(self) -> None:
        start_after = self._window.listed_up_to or self._window.start_after
        entries, self._token = await self._list_page(
            None if self._token else start_after, self._token
        )
        self.requests += 1
        beyond_stop = (
            self._stop_at is not None and bool(entries) and entries[-1][0] >= self._stop_at
        )
        self._window.add(entries, exhausted=self._token is None or beyond_stop)
