from __future__ import annotations

from datetime import UTC, datetime

from layer_cache.cache_types import CacheType
from migrations_mode.checkpoint import Position
from migrations_mode.progress_store import (
    ProgressKey,
    SavedProgress,
    progress_from_json,
    progress_to_json,
    s3_progress_object_key,
)

CUTOFF = datetime(2026, 1, 13, 17, 30, 26, 445817, tzinfo=UTC)


def test_progress_round_trips_through_json() -> None:
    for progress in (
        SavedProgress(Position(CUTOFF, "abc"), completed=False, rows_done=12),
        SavedProgress(None, completed=True, rows_done=0),
    ):
        assert progress_from_json(progress_to_json(progress)) == progress


def test_s3_progress_objects_are_per_cutoff_and_shard_and_never_a_row_key() -> None:
    key = ProgressKey(CacheType.CAS, CUTOFF, "2-of-4")
    assert s3_progress_object_key(key, None) == (
        "_si_backfill_progress/2026-01-13T17:30:26.445817+00:00/2-of-4.json"
    )
    assert s3_progress_object_key(key, "run1").startswith("run1/_si_backfill_progress/")
