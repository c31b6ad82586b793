from __future__ import annotations

from datetime import UTC, datetime

from layer_cache.cache_types import CacheType
from migrations_mode.checkpoint import Position
from migrations_mode.progress_store import (
    ProgressKey,
    RecordIdentity,
    SavedProgress,
    identity_differences,
    progress_from_json,
    progress_target,
    progress_to_json,
    s3_progress_object_key,
    s3_record_identity,
    unused_records,
)
from migrations_mode.walk import WalkOrder

CUTOFF = datetime(2026, 1, 13, 17, 30, 26, 445817, tzinfo=UTC)


def test_progress_round_trips_through_json() -> None:
    for progress in (
        SavedProgress(Position(CUTOFF, "abc"), completed=False, rows_done=12),
        SavedProgress(None, completed=True, rows_done=0),
    ):
        assert progress_from_json(progress_to_json(progress)) == progress


TARGET = progress_target("http://127.0.0.1:9000/", "si-layer-cache-cas", None)


def test_s3_progress_objects_are_per_cutoff_order_and_shard_and_never_a_row_key() -> None:
    key = ProgressKey(CacheType.CAS, CUTOFF, WalkOrder.NEWEST_FIRST, TARGET, "2-of-4")
    assert s3_progress_object_key(key, None) == (
        "_si_backfill_progress/2026-01-13T17:30:26.445817+00:00/newest-first/2-of-4.json"
    )
    assert s3_progress_object_key(key, "run1").startswith("run1/_si_backfill_progress/")


def test_the_target_names_endpoint_bucket_and_key_prefix() -> None:
    assert TARGET == "http://127.0.0.1:9000/si-layer-cache-cas/"
    assert progress_target(None, "b", "p") == "aws/b/p"
    assert progress_target("https://s3.amazonaws.com", "b", "p") != progress_target(
        "https://s3.amazonaws.com", "b", "q"
    )


def test_s3_record_names_are_read_back_in_both_layouts() -> None:
    assert s3_record_identity("key/0-of-1.json", TARGET) == RecordIdentity("key", TARGET, "0-of-1")
    # The earlier layout had no order in the name.
    assert s3_record_identity("0-of-1.json", TARGET) == RecordIdentity("", TARGET, "0-of-1")
    assert s3_record_identity("dry-run-write-probe", TARGET) is None
    assert s3_record_identity("a/b/0-of-1.json", TARGET) is None


def test_identity_differences_name_each_parameter() -> None:
    ours = RecordIdentity("key", TARGET, "0-of-1")
    assert identity_differences(ours, ours) == []
    assert identity_differences(ours, RecordIdentity("newest-first", TARGET, "0-of-1")) == [
        "walk order"
    ]
    assert identity_differences(ours, RecordIdentity("", "", "0-of-2")) == [
        "walk order",
        "target",
        "shard",
    ]


def test_unused_records_skip_sibling_shards_and_put_the_closest_first() -> None:
    ours = RecordIdentity("key", TARGET, "1-of-4")
    siblings = [RecordIdentity("key", TARGET, f"{index}-of-4") for index in (0, 2, 3)]
    assert unused_records(ours, siblings) == []
    other_count = RecordIdentity("key", TARGET, "0-of-2")
    other_everything = RecordIdentity("newest-first", "elsewhere", "1-of-4")
    assert unused_records(ours, [*siblings, other_everything, other_count]) == [
        (other_count, ["shard"]),
        (other_everything, ["walk order", "target"]),
    ]
