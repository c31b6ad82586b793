"""What the backfill does with one row, per ``VerifyMode``: copy it, compare it, or repair it.

``ROW_ACTIONS`` maps each mode to its action. ``settle(row, stored)`` is pure: given what S3
reports for the row's object (from the listing or a HEAD: size and ETag; None when absent;
``UNKNOWN`` when the listing cannot tell) it says whether the row is settled now (skipped, or
verified) or needs a HEAD or its value; ``finish`` then does the rest with the value in hand:
PUT it (copy), GET the object and compare (verify content), or both where they differ (repair).
Every PUT first waits for the process's upload rate limits (``UploadPacer``), and ``finish``
returns how long it waited, which is not S3's time; a GET is never paced.
A content comparison trusts an ETag only when it *is* the row's MD5 (Postgres computes the MD5
in the listing query): then the object holds the row's bytes and nothing is read. Any other ETag
proves nothing (SSE-KMS, DSSE-KMS and SSE-C objects have ETags that look like MD5s and are not,
multipart ones are no MD5 at all), so the object is read. Differences go to the run's
``DifferenceReport``. The pipeline in ``cache_backfill`` holds the slots, bytes and order; an
action holds no resource and each call ends with its row, so nothing here needs shutting down.
"""

from __future__ import annotations

import abc
import hashlib
import time
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol, TypeVar

import structlog

from layer_cache.pg import RowRef
from layer_cache.rate_limit import UploadPacer
from layer_cache.s3 import S3Layer, StoredObject
from migrations_mode.bucket_index import UNKNOWN, Stored
from migrations_mode.config import VerifyMode
from migrations_mode.differences import Difference, DifferenceKind, DifferenceReport
from migrations_mode.progress import CacheProgress
from migrations_mode.storage_caller import StorageCall

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Decision(Enum):
    """What a row needs, given what S3 reports for it."""

    NEEDS_HEAD = auto()  # the listing could not tell: HEAD the object, then settle again
    SKIPPED = auto()  # copying, and the object is there with the row's size
    VERIFIED = auto()  # comparing, and what S3 reports is the verdict (size, or a vouching ETag)
    NEEDS_VALUE = auto()  # read the row's value, then ``finish``

    @property
    def settled(self) -> bool:
        """Nothing more to do for the row but count it (``record_settled``)."""
        return self in (Decision.SKIPPED, Decision.VERIFIED)


def known_difference(row: RowRef, stored: StoredObject | None) -> DifferenceKind | None:
    """What listing or HEAD alone proves: the object is missing or has another size."""
    if stored is None:
        return DifferenceKind.MISSING
    if stored.size != row.size:
        return DifferenceKind.SIZE
    return None


def vouched(row: RowRef, stored: StoredObject | None) -> bool:
    """The object has the row's size and an ETag that is the row's MD5: it holds the row's
    bytes, with nothing read."""
    return (
        stored is not None
        and known_difference(row, stored) is None
        and stored.etag_vouches_for(row.md5)
    )


def body_difference(value: bytes, body: bytes | None) -> DifferenceKind | None:
    """What reading the object proves: missing, another size, other bytes, or nothing."""
    if body is None:
        return DifferenceKind.MISSING
    if len(body) != len(value):
        return DifferenceKind.SIZE
    return None if body == value else DifferenceKind.CONTENT


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class RowAction(Protocol):
    """One mode's per-row work."""

    writes: bool  # PUTs objects and saves progress (a verification writes nothing)
    counts_extra: bool  # reports objects in the walked range that no row accounts for
    needs_md5: bool  # the listing should carry each row's MD5 (content comparisons)

    def settle(self, row: RowRef, stored: Stored) -> Decision:
        """What the row needs, given what S3 reports for it."""

    def record_settled(self, row: RowRef, stored: Stored, decision: Decision) -> None:
        """Count a row that ``settle`` found ``SKIPPED`` or ``VERIFIED``."""

    async def finish(self, row: RowRef, value: bytes, stored: Stored) -> float:
        """Do the row's work with its value in hand; the seconds it waited for the rate limits
        (not S3's time)."""


@dataclass(kw_only=True)
class _Action(abc.ABC):
    """What every mode shares: the counters, the S3 layer, the report, settled rows' counts, and
    the HEAD a row needs whatever the mode when the listing cannot tell."""

    writes = False
    counts_extra = False
    needs_md5 = False

    progress: CacheProgress
    s3: S3Layer
    storage: StorageCall
    report: DifferenceReport
    pacer: UploadPacer  # uploads only: a verification PUTs nothing

    @classmethod
    def settle(cls, row: RowRef, stored: Stored) -> Decision:
        """What the row needs, given what S3 reports for it."""
        return Decision.NEEDS_HEAD if stored is UNKNOWN else cls.settle_known(row, stored)

    @staticmethod
    @abc.abstractmethod
    def settle_known(row: RowRef, stored: StoredObject | None) -> Decision:
        """What the row needs, given its object (None: there is none)."""

    @abc.abstractmethod
    async def finish(self, row: RowRef, value: bytes, stored: Stored) -> float:
        """Do the row's work with its value in hand; the seconds it waited for the rate limits
        (not S3's time)."""

    def record_settled(self, row: RowRef, stored: Stored, decision: Decision) -> None:
        """Count a row that ``settle`` found ``SKIPPED`` or ``VERIFIED``."""
        if decision is Decision.SKIPPED:
            self.progress.skipped()
            return
        assert stored is not UNKNOWN
        self.record_verification(row, known_difference(row, stored), stored)

    def record_verification(
        self,
        row: RowRef,
        kind: DifferenceKind | None,
        stored: Stored,
        *,
        body_md5: str | None = None,
        repaired: bool = False,
    ) -> None:
        """Count a comparison; a difference also goes to the report."""
        self.progress.verified(None if kind is None else kind.value)
        if kind is None:
            return
        listed = stored if isinstance(stored, StoredObject) else None
        self.report.record(
            Difference(
                self.progress.stats.cache_type,
                row.key,
                self.s3.object_key(row.key),
                kind,
                row_size=row.size,
                object_size=None if listed is None else listed.size,
                row_md5=row.md5,
                object_etag=None if listed is None else listed.etag,
                object_md5=body_md5,
                repaired=repaired,
            )
        )

    async def put(
        self, row: RowRef, value: bytes, *, repaired: bool, row_done: bool = True
    ) -> float:
        """PUT the value once the rate limits let it go, timed (retries included) and counted
        (the row as processed too, unless ``row_done`` is False); returns the seconds it waited
        for the rate limits."""
        waited = await self.pacer.acquire(len(value))
        if waited > 0:
            self.progress.rate_limited(waited)
        started = time.monotonic()
        await self.storage(lambda: self.s3.put(row.key, value), key=row.key)
        self.progress.upload_took(time.monotonic() - started)
        log.debug("uploaded to S3", key=row.key, row_size=len(value))
        self.progress.uploaded(len(value), repaired=repaired, row_done=row_done)
        return waited


class Copy(_Action):
    """PUT every row whose object is absent or of another size (``repaired`` when replacing)."""

    writes = True

    @staticmethod
    def settle_known(row: RowRef, stored: StoredObject | None) -> Decision:
        """Skip a row whose object has its size; else its value is needed."""
        if stored is not None and stored.size == row.size:
            return Decision.SKIPPED
        return Decision.NEEDS_VALUE

    async def finish(self, row: RowRef, value: bytes, stored: Stored) -> float:
        """PUT the value."""
        return await self.put(row, value, repaired=stored is not None)


class VerifyContent(_Action):
    """Compare every row's bytes with its object's; write nothing. An ETag that is the row's
    MD5 settles the row; otherwise the object is read."""

    counts_extra = True
    needs_md5 = True

    @staticmethod
    def settle_known(row: RowRef, stored: StoredObject | None) -> Decision:
        """A missing or other-sized object, or a vouching ETag, is the verdict; else read."""
        proven = known_difference(row, stored) is not None or vouched(row, stored)
        return Decision.VERIFIED if proven else Decision.NEEDS_VALUE

    async def finish(self, row: RowRef, value: bytes, stored: Stored) -> float:
        """GET the object and compare it with the value."""
        body = await self.storage(lambda: self.s3.get(row.key), key=row.key)
        self.record_verification(
            row,
            body_difference(value, body),
            _as_read(stored, body),
            body_md5=None if body is None else _md5_hex(body),
        )
        return 0.0


class VerifySize(VerifyContent):
    """Compare every row's size with its object's; write nothing, read no value."""

    needs_md5 = False

    @staticmethod
    def settle_known(row: RowRef, stored: StoredObject | None) -> Decision:
        """A known size is the verdict."""
        return Decision.VERIFIED


class Repair(VerifyContent):
    """Compare as ``VerifyContent`` does and re-upload every object that is missing or differs
    (same-size changes included); never delete anything, so extra objects are not looked for."""

    writes = True
    counts_extra = False

    @staticmethod
    def settle_known(row: RowRef, stored: StoredObject | None) -> Decision:
        """A vouching ETag settles the row; anything else needs the value (to PUT or compare)."""
        return Decision.VERIFIED if vouched(row, stored) else Decision.NEEDS_VALUE

    async def finish(self, row: RowRef, value: bytes, stored: Stored) -> float:
        """PUT the value where the listing already proves a difference; else read the object,
        compare, and PUT only if it differs."""
        assert stored is not UNKNOWN
        kind = known_difference(row, stored)
        body_md5 = None
        if kind is None:
            body = await self.storage(lambda: self.s3.get(row.key), key=row.key)
            kind = body_difference(value, body)
            body_md5 = None if body is None else _md5_hex(body)
            stored = _as_read(stored, body)
        waited = 0.0
        if kind is not None:  # the row is counted once, by its comparison below
            waited = await self.put(row, value, repaired=True, row_done=False)
        self.record_verification(row, kind, stored, body_md5=body_md5, repaired=kind is not None)
        return waited


def _as_read(stored: Stored, body: bytes | None) -> Stored:
    """What S3 holds once the object was read: the listing's ETag with the body's size."""
    if body is None:
        return None
    etag = stored.etag if isinstance(stored, StoredObject) else None
    return StoredObject(len(body), etag)


ROW_ACTIONS: dict[VerifyMode, type[_Action]] = {
    VerifyMode.OFF: Copy,
    VerifyMode.SIZE: VerifySize,
    VerifyMode.CONTENT: VerifyContent,
    VerifyMode.REPAIR: Repair,
}


def row_action(
    mode: VerifyMode,
    *,
    progress: CacheProgress,
    s3: S3Layer,
    storage: StorageCall,
    report: DifferenceReport,
    pacer: UploadPacer,
) -> RowAction:
    """The action for ``mode``."""
    action: RowAction = ROW_ACTIONS[mode](
        progress=progress, s3=s3, storage=storage, report=report, pacer=pacer
    )
    return action
