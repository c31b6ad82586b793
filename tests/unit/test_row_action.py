"""What each mode does with a row, decided from what S3 reports (pure), and the row's work done
against recording fakes of the storage call (no I/O: the integration tests run the real thing)."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from opentelemetry.sdk.metrics import MeterProvider

from layer_cache.cache_types import CacheType
from layer_cache.pg import RowRef
from layer_cache.rate_limit import UploadPacer
from layer_cache.s3 import StoredObject
from migrations_mode.bucket_index import UNKNOWN, Stored
from migrations_mode.config import VerifyMode
from migrations_mode.differences import Difference, DifferenceKind, DifferenceReport
from migrations_mode.progress import BackfillMetrics, CacheProgress
from migrations_mode.row_action import (
    ROW_ACTIONS,
    Copy,
    Decision,
    Repair,
    VerifyContent,
    VerifySize,
    body_difference,
    known_difference,
    row_action,
)

T = TypeVar("T")

VALUE = b"0123456789"
MD5 = hashlib.md5(VALUE).hexdigest()
ROW = RowRef("ab01", datetime(2026, 1, 13, tzinfo=UTC), size=10, md5=MD5)
SAME = StoredObject(10, MD5)  # a plain (unencrypted, single-part) object with the row's bytes
KMS = StoredObject(10, "9" * 32)  # an ETag that looks like an MD5 and is not one
SHORT = StoredObject(9, "1" * 32)


def test_every_mode_has_an_action_and_only_copy_and_repair_write() -> None:
    assert set(ROW_ACTIONS) == set(VerifyMode)
    assert {mode for mode, action in ROW_ACTIONS.items() if action.writes} == {
        VerifyMode.OFF,
        VerifyMode.REPAIR,
    }
    assert {mode for mode, action in ROW_ACTIONS.items() if action.writes} == {
        mode for mode in VerifyMode if mode.writes
    }
    # A repair never deletes, so it does not look for objects without rows.
    assert {mode for mode, action in ROW_ACTIONS.items() if action.counts_extra} == {
        VerifyMode.SIZE,
        VerifyMode.CONTENT,
    }
    assert {mode for mode, action in ROW_ACTIONS.items() if action.needs_md5} == {
        VerifyMode.CONTENT,
        VerifyMode.REPAIR,
    }


@pytest.mark.parametrize("action", [Copy, VerifySize, VerifyContent, Repair])
def test_what_the_listing_cannot_tell_is_headed_first_in_every_mode(
    action: type[Copy | VerifyContent],
) -> None:
    assert action.settle(ROW, UNKNOWN) is Decision.NEEDS_HEAD


@pytest.mark.parametrize(
    ("stored", "decision"),
    [
        (SAME, Decision.SKIPPED),
        (KMS, Decision.SKIPPED),
        (None, Decision.NEEDS_VALUE),
        (SHORT, Decision.NEEDS_VALUE),
    ],
)
def test_a_copy_skips_an_object_of_the_rows_size_and_puts_an_absent_or_other_sized_one(
    stored: Stored, decision: Decision
) -> None:
    assert Copy.settle(ROW, stored) is decision


@pytest.mark.parametrize("stored", [SAME, KMS, None, SHORT, StoredObject(0)])
def test_a_size_verification_settles_every_known_object_and_never_reads_a_value(
    stored: Stored,
) -> None:
    assert VerifySize.settle(ROW, stored) is Decision.VERIFIED


@pytest.mark.parametrize(
    ("stored", "decision"),
    [
        (SAME, Decision.VERIFIED),  # the ETag is the row's MD5: nothing to read
        (None, Decision.VERIFIED),  # missing: the listing is the verdict
        (SHORT, Decision.VERIFIED),  # another size: likewise
        (KMS, Decision.NEEDS_VALUE),  # an ETag that proves nothing: read the object
        (StoredObject(10, f"{MD5}-1"), Decision.NEEDS_VALUE),  # multipart
        (StoredObject(10, None), Decision.NEEDS_VALUE),
    ],
)
def test_a_content_verification_reads_only_what_the_etag_cannot_vouch_for(
    stored: Stored, decision: Decision
) -> None:
    assert VerifyContent.settle(ROW, stored) is decision


@pytest.mark.parametrize(
    ("stored", "decision"),
    [
        (SAME, Decision.VERIFIED),
        (None, Decision.NEEDS_VALUE),  # to PUT it
        (SHORT, Decision.NEEDS_VALUE),  # to PUT it
        (KMS, Decision.NEEDS_VALUE),  # to compare it
    ],
)
def test_a_repair_needs_the_value_of_every_row_its_etag_does_not_vouch_for(
    stored: Stored, decision: Decision
) -> None:
    assert Repair.settle(ROW, stored) is decision


def test_a_row_without_an_md5_is_never_vouched_for() -> None:
    unhashed = RowRef("ab01", ROW.created_at, size=10)
    assert VerifyContent.settle(unhashed, SAME) is Decision.NEEDS_VALUE


def test_only_skipped_and_verified_rows_are_settled_without_more_work() -> None:
    assert {decision for decision in Decision if decision.settled} == {
        Decision.SKIPPED,
        Decision.VERIFIED,
    }


@pytest.mark.parametrize(
    ("stored", "expected"),
    [(None, DifferenceKind.MISSING), (SHORT, DifferenceKind.SIZE), (SAME, None), (KMS, None)],
)
def test_the_listing_alone_proves_a_missing_or_other_sized_object(
    stored: StoredObject | None, expected: DifferenceKind | None
) -> None:
    assert known_difference(ROW, stored) is expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (None, DifferenceKind.MISSING),
        (VALUE[:-1], DifferenceKind.SIZE),
        (b"0123456780", DifferenceKind.CONTENT),  # the same size, one byte changed
        (VALUE, None),
    ],
)
def test_reading_the_object_proves_missing_other_size_other_bytes_or_the_same(
    body: bytes | None, expected: DifferenceKind | None
) -> None:
    assert body_difference(VALUE, body) is expected


# --------------------------------------------------------------------------------------------
# The row's work, against fakes that record what would be sent


class FakeS3:
    """Holds one object's body; records PUTs."""

    def __init__(self, body: bytes | None) -> None:
        self.body = body
        self.puts: list[tuple[str, bytes]] = []

    def object_key(self, key: str) -> str:
        return f"ab/01/{key}"

    async def get(self, key: str) -> bytes | None:
        return self.body

    async def put(self, key: str, body: bytes) -> None:
        self.puts.append((key, body))
        self.body = body


class RecordingReport(DifferenceReport):
    def __init__(self) -> None:
        super().__init__()
        self.differences: list[Difference] = []

    def record(self, difference: Difference) -> None:
        self.differences.append(difference)


async def direct_call(call: Callable[[], Awaitable[T]], *, key: str | None = None) -> T:
    return await call()


def make(mode: VerifyMode, body: bytes | None) -> tuple[Any, FakeS3, RecordingReport]:
    s3 = FakeS3(body)
    report = RecordingReport()
    progress = CacheProgress(CacheType.CAS, BackfillMetrics(MeterProvider().get_meter("t")))
    action = row_action(
        mode,
        progress=progress,
        s3=s3,  # type: ignore[arg-type]
        storage=direct_call,
        report=report,
        pacer=UploadPacer(),
    )
    return action, s3, report


@pytest.mark.parametrize(
    ("body", "stored", "kind"),
    [
        (b"0123456780", KMS, DifferenceKind.CONTENT),  # same size, other bytes
        (None, KMS, DifferenceKind.MISSING),  # gone since the listing
        (VALUE, KMS, None),  # an encrypted object with the row's bytes
    ],
)
async def test_a_repair_reads_compares_and_puts_only_an_object_that_differs(
    body: bytes | None, stored: Stored, kind: DifferenceKind | None
) -> None:
    action, s3, report = make(VerifyMode.REPAIR, body)

    await action.finish(ROW, VALUE, stored)

    assert s3.puts == ([] if kind is None else [(ROW.key, VALUE)])
    assert [d.kind for d in report.differences] == ([] if kind is None else [kind])
    assert all(d.repaired for d in report.differences)
    stats = action.progress.stats
    assert (stats.repaired, stats.uploaded) == ((0, 0) if kind is None else (1, 1))
    assert stats.processed == 1  # one row, whether or not it was re-uploaded


@pytest.mark.parametrize(("stored", "kind"), [(None, "missing"), (SHORT, "size")])
async def test_a_repair_puts_what_the_listing_proves_different_without_reading_it(
    stored: Stored, kind: str
) -> None:
    action, s3, report = make(VerifyMode.REPAIR, b"not to be read")
    s3.get = None  # type: ignore[assignment,method-assign]  # reading would fail the test

    await action.finish(ROW, VALUE, stored)

    assert s3.puts == [(ROW.key, VALUE)]
    [difference] = report.differences
    assert (difference.kind, difference.repaired, difference.row_md5) == (kind, True, MD5)
    assert action.progress.stats.processed == 1


async def test_a_content_verification_reports_a_same_size_change_with_both_digests() -> None:
    changed = b"0123456780"
    action, s3, report = make(VerifyMode.CONTENT, changed)

    await action.finish(ROW, VALUE, KMS)

    assert s3.puts == []
    [difference] = report.differences
    assert difference.kind is DifferenceKind.CONTENT
    assert (difference.row_size, difference.object_size) == (10, 10)
    assert (difference.row_md5, difference.object_md5) == (MD5, hashlib.md5(changed).hexdigest())
    assert difference.object_etag == KMS.etag
    assert difference.object_key == "ab/01/ab01"
    assert not difference.repaired
    assert action.progress.stats.mismatched == 1


def test_the_report_line_is_one_json_object_with_every_field() -> None:
    line = Difference(
        CacheType.CAS, "k", "k", DifferenceKind.SIZE, row_size=3, object_size=2
    ).as_json()
    assert line.startswith('{"cache_type":"cas","key":"k","object_key":"k","kind":"size"')
    assert "\n" not in line


@pytest.mark.parametrize(
    ("mode", "stored", "expected"),
    [
        (VerifyMode.OFF, None, ["pace", "put"]),
        (VerifyMode.REPAIR, SHORT, ["pace", "put"]),  # the listing proves it: PUT at once
        (VerifyMode.REPAIR, KMS, ["get", "pace", "put"]),  # read, differs, then PUT
        (VerifyMode.CONTENT, KMS, ["get"]),  # a verification PUTs nothing, so never waits
    ],
)
async def test_every_put_waits_for_the_rate_limits_first_and_a_read_never_does(
    mode: VerifyMode, stored: Stored, expected: list[str]
) -> None:
    s3 = FakeS3(b"0123456780")
    calls: list[str] = []
    get, put = s3.get, s3.put

    async def recorded_get(key: str) -> bytes | None:
        calls.append("get")
        return await get(key)

    async def recorded_put(key: str, body: bytes) -> None:
        calls.append("put")
        await put(key, body)

    class RecordingPacer(UploadPacer):
        async def acquire(self, size: int) -> float:
            assert size == len(VALUE)
            calls.append("pace")
            return 0.0

    s3.get, s3.put = recorded_get, recorded_put  # type: ignore[method-assign]
    progress = CacheProgress(CacheType.CAS, BackfillMetrics(MeterProvider().get_meter("t")))
    action = row_action(
        mode,
        progress=progress,
        s3=s3,  # type: ignore[arg-type]
        storage=direct_call,
        report=RecordingReport(),
        pacer=RecordingPacer(),
    )

    await action.finish(ROW, VALUE, stored)

    assert calls == expected
