from __future__ import annotations

from datetime import UTC, datetime

import pytest

from layer_cache.pg import RowRef
from migrations_mode.bucket_index import UNKNOWN
from migrations_mode.config import VerifyMode
from migrations_mode.row_action import (
    ROW_ACTIONS,
    Copy,
    Decision,
    Verdict,
    VerifyContent,
    VerifySize,
    verdict,
)

ROW = RowRef("ab01", datetime(2026, 1, 13, tzinfo=UTC), size=10)


def test_every_verify_mode_has_an_action_and_only_a_copy_writes() -> None:
    assert set(ROW_ACTIONS) == set(VerifyMode)
    assert [mode for mode, action in ROW_ACTIONS.items() if action.writes] == [VerifyMode.OFF]
    assert {mode for mode, action in ROW_ACTIONS.items() if action.counts_extra} == {
        VerifyMode.SIZE,
        VerifyMode.CONTENT,
    }


@pytest.mark.parametrize("action", [Copy, VerifySize, VerifyContent])
def test_a_size_the_listing_cannot_tell_is_headed_first_in_every_mode(
    action: type[Copy | VerifyContent],
) -> None:
    assert action.settle(ROW, UNKNOWN) is Decision.NEEDS_HEAD


@pytest.mark.parametrize(
    ("stored", "decision"),
    [(10, Decision.SKIPPED), (None, Decision.NEEDS_VALUE), (9, Decision.NEEDS_VALUE)],
)
def test_a_copy_skips_an_object_of_the_rows_size_and_puts_an_absent_or_other_sized_one(
    stored: int | None, decision: Decision
) -> None:
    assert Copy.settle(ROW, stored) is decision


@pytest.mark.parametrize("stored", [10, None, 9, 0])
def test_a_size_verification_settles_every_known_size_and_never_reads_a_value(
    stored: int | None,
) -> None:
    assert VerifySize.settle(ROW, stored) is Decision.VERIFIED


@pytest.mark.parametrize("stored", [10, None, 9])
def test_a_content_verification_reads_every_value_even_for_an_absent_object(
    stored: int | None,
) -> None:
    assert VerifyContent.settle(ROW, stored) is Decision.NEEDS_VALUE


def test_only_skipped_and_verified_rows_are_settled_without_more_work() -> None:
    assert {decision for decision in Decision if decision.settled} == {
        Decision.SKIPPED,
        Decision.VERIFIED,
    }


@pytest.mark.parametrize(
    ("stored", "matches", "expected"),
    [
        (None, None, Verdict.MISSING),
        (None, False, Verdict.MISSING),
        (9, None, Verdict.MISMATCHED),
        (10, False, Verdict.MISMATCHED),
        (9, True, Verdict.MISMATCHED),
        (10, None, Verdict.OK),
        (10, True, Verdict.OK),
    ],
)
def test_verdict_is_missing_then_differing_size_or_bytes_then_ok(
    stored: int | None, matches: bool | None, expected: Verdict
) -> None:
    assert verdict(10, stored, matches=matches) is expected
