"""What the backfill does with one row, per ``VerifyMode``: copy it, or compare its size or bytes.

``ROW_ACTIONS`` maps each mode to its action. ``settle(row, stored)`` is pure: given the size S3
reports (from the listing or a HEAD; ``UNKNOWN`` when the listing cannot tell) it says whether
the row is settled now (skipped, or verified by size) or needs a HEAD or its value; ``finish``
then PUTs the value (copy; first it awaits ``pace``, the process's upload rate limits) or GETs
the object and compares (verify, never paced). The pipeline in
``cache_backfill`` holds the slots, bytes and order; an action holds no resource and each call
ends with its row, so nothing here needs shutting down.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from enum import Enum, auto
from typing import Protocol, TypeVar

import structlog

from layer_cache.pg import RowRef
from layer_cache.s3 import S3Layer
from migrations_mode.bucket_index import UNKNOWN
from migrations_mode.config import VerifyMode
from migrations_mode.progress import CacheProgress

log = structlog.get_logger(__name__)

T = TypeVar("T")


class StorageCall(Protocol):
    """One storage call under the retry policy; ``key`` names the row in retries and failures."""

    async def __call__(self, call: Callable[[], Awaitable[T]], *, key: str | None = None) -> T:
        """The call's result; raises ``CacheBackfillFailed`` once retries are exhausted."""


class Pace(Protocol):
    """Wait for the process's upload rate limits before PUTting ``size`` bytes for row ``key``."""

    async def __call__(self, key: str, size: int) -> None:
        """Returns when the upload may go."""


async def unpaced(key: str, size: int) -> None:
    """No rate limit."""


class Decision(Enum):
    """What a row needs, given what S3 reports for it."""

    NEEDS_HEAD = auto()  # the listing could not tell: HEAD the object, then settle again
    SKIPPED = auto()  # copying, and the object is there with the row's size
    VERIFIED = auto()  # verifying sizes: the size S3 reports is the verdict
    NEEDS_VALUE = auto()  # read the row's value, then ``finish`` (PUT it, or compare content)

    @property
    def settled(self) -> bool:
        """Nothing more to do for the row but count it (``record_settled``)."""
        return self in (Decision.SKIPPED, Decision.VERIFIED)


class Verdict(Enum):
    """A verification's outcome (the value is what ``CacheProgress.verified`` counts)."""

    OK = "ok"
    MISSING = "missing"
    MISMATCHED = "mismatched"


def verdict(row_size: int, stored: int | None, *, matches: bool | None = None) -> Verdict:
    """A row's object compared: absent, another size or other bytes, or the same."""
    if stored is None:
        return Verdict.MISSING
    if stored != row_size or matches is False:
        return Verdict.MISMATCHED
    return Verdict.OK


class RowAction(Protocol):
    """One mode's per-row work."""

    writes: bool  # PUTs objects and saves progress (a verification writes nothing)
    counts_extra: bool  # reports objects in the walked range that no row accounts for

    def settle(self, row: RowRef, stored: int | None) -> Decision:
        """What the row needs, given S3's size for it (None: absent; ``UNKNOWN``: not known)."""

    def record_settled(self, row: RowRef, stored: int | None, decision: Decision) -> None:
        """Count a row that ``settle`` found ``SKIPPED`` or ``VERIFIED``."""

    async def finish(self, row: RowRef, value: bytes, stored: int | None) -> None:
        """Do the row's work with its value in hand."""


class _Action:
    """What every mode shares: the counters, the S3 layer, and settled rows' bookkeeping."""

    def __init__(
        self,
        *,
        progress: CacheProgress,
        s3: S3Layer,
        storage_call: StorageCall,
        pace: Pace = unpaced,
    ) -> None:
        self.progress = progress
        self.s3 = s3
        self.storage_call = storage_call
        self.pace = pace  # uploads only: a verification PUTs nothing

    def record_settled(self, row: RowRef, stored: int | None, decision: Decision) -> None:
        """Count a row that ``settle`` found ``SKIPPED`` or ``VERIFIED``."""
        if decision is Decision.SKIPPED:
            self.progress.skipped()
        else:
            self.record_verification(row, verdict(row.size, stored), stored)

    def record_verification(self, row: RowRef, outcome: Verdict, stored: int | None) -> None:
        """Count a verification, with a warning for each object missing or differing."""
        if outcome is Verdict.MISSING:
            log.warning("verify: object missing", key=row.key)
        elif outcome is Verdict.MISMATCHED:
            log.warning("verify: object differs", key=row.key, row_size=row.size, size=stored)
        self.progress.verified(outcome.value)


class Copy(_Action):
    """PUT every row whose object is absent or of another size (``repaired`` when replacing)."""

    writes = True
    counts_extra = False

    @staticmethod
    def settle(row: RowRef, stored: int | None) -> Decision:
        """Skip a row whose object has its size; else its value is needed."""
        if stored == UNKNOWN:
            return Decision.NEEDS_HEAD
        return Decision.SKIPPED if stored == row.size else Decision.NEEDS_VALUE

    async def finish(self, row: RowRef, value: bytes, stored: int | None) -> None:
        """PUT the value once the rate limits let it go, timed (retries included) and counted."""
        await self.pace(row.key, len(value))
        started = time.monotonic()
        await self.storage_call(lambda: self.s3.put(row.key, value), key=row.key)
        self.progress.upload_took(time.monotonic() - started)
        log.debug("uploaded to S3", key=row.key, size=len(value))
        self.progress.uploaded(len(value), repaired=stored is not None)


class VerifyContent(_Action):
    """Compare every row's value with its object's bytes; write nothing."""

    writes = False
    counts_extra = True

    @staticmethod
    def settle(row: RowRef, stored: int | None) -> Decision:
        """Every row's value is needed (even an absent object: the GET reports it missing)."""
        return Decision.NEEDS_HEAD if stored == UNKNOWN else Decision.NEEDS_VALUE

    async def finish(self, row: RowRef, value: bytes, stored: int | None) -> None:
        """GET the object and compare it with the value."""
        body = await self.storage_call(lambda: self.s3.get(row.key), key=row.key)
        stored_size = None if body is None else len(body)
        self.record_verification(
            row, verdict(row.size, stored_size, matches=body == value), stored_size
        )


class VerifySize(VerifyContent):
    """Compare every row's size with its object's; write nothing, read no value."""

    @staticmethod
    def settle(row: RowRef, stored: int | None) -> Decision:
        """A known size is the verdict."""
        return Decision.NEEDS_HEAD if stored == UNKNOWN else Decision.VERIFIED


ROW_ACTIONS: dict[VerifyMode, type[Copy] | type[VerifyContent]] = {
    VerifyMode.OFF: Copy,
    VerifyMode.SIZE: VerifySize,
    VerifyMode.CONTENT: VerifyContent,
}


def row_action(
    mode: VerifyMode,
    *,
    progress: CacheProgress,
    s3: S3Layer,
    storage_call: StorageCall,
    pace: Pace = unpaced,
) -> RowAction:
    """The action for ``mode``."""
    return ROW_ACTIONS[mode](progress=progress, s3=s3, storage_call=storage_call, pace=pace)
