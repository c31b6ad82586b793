from __future__ import annotations

from typing import cast

import asyncpg
import pytest
import structlog

from layer_cache.cache_types import CacheType
from layer_cache.errors import PreflightError
from layer_cache.pg import read_only_reason
from migrations_mode.checkpoint import Position
from migrations_mode.progress_store import (
    PgProgressStore,
    ProgressKey,
    ProgressStoreKind,
    RecordIdentity,
    S3ProgressStore,
    SavedProgress,
    identity_differences,
    open_progress_store,
    progress_from_json,
    progress_target,
    progress_to_json,
    s3_progress_object_key,
    s3_record_identity,
    unused_records,
)
from migrations_mode.walk import WalkOrder
from tests.support import CUTOFF


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


# --------------------------------------------------------------------------------------------
# A layer database that takes no writes (a read replica)


def test_a_standby_or_a_read_only_default_is_named_and_a_writable_server_is_not() -> None:
    assert read_only_reason(True, "off") == "a standby in recovery"
    assert read_only_reason(True, "on") == "a standby in recovery"
    assert read_only_reason(False, "on") == "default_transaction_read_only=on"
    assert read_only_reason(False, "off") is None


class _UntouchedPool:
    """Stands in for the pool where choosing a store must send nothing to Postgres."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the pool was used: {name}")


UNTOUCHED = cast(asyncpg.Pool, _UntouchedPool())


@pytest.mark.parametrize("kind", [ProgressStoreKind.AUTO, ProgressStoreKind.S3])
@pytest.mark.parametrize("writes", [True, False], ids=["copy", "verify"])
async def test_on_a_read_only_server_progress_goes_to_s3_said_in_one_line_without_ddl(
    kind: ProgressStoreKind, writes: bool
) -> None:
    with structlog.testing.capture_logs() as logs:
        store = await open_progress_store(
            kind, UNTOUCHED, {}, read_only="a standby in recovery", writes=writes
        )
    assert isinstance(store, S3ProgressStore)
    assert logs == [
        {
            "event": "layer db is read-only",
            "reason": "a standby in recovery",
            "progress_store": "s3",
            "log_level": "info",
        }
    ]


async def test_a_postgres_store_on_a_read_only_server_is_refused_unless_nothing_is_saved() -> None:
    with structlog.testing.capture_logs() as logs, pytest.raises(PreflightError) as refused:
        await open_progress_store(
            ProgressStoreKind.POSTGRES, UNTOUCHED, {}, read_only="a standby in recovery"
        )
    assert str(refused.value) == (
        "the layer database is read-only (a standby in recovery), so --backfill-progress-store "
        "postgres cannot keep progress there; use --backfill-progress-store s3 (or auto)"
    )
    assert logs == []  # the refusal is the run's one line
    verification = await open_progress_store(
        ProgressStoreKind.POSTGRES, UNTOUCHED, {}, read_only="a standby in recovery", writes=False
    )
    assert isinstance(verification, S3ProgressStore)


@pytest.mark.parametrize("kind", [ProgressStoreKind.AUTO, ProgressStoreKind.POSTGRES])
async def test_a_verification_on_a_writable_server_creates_no_progress_table(
    kind: ProgressStoreKind,
) -> None:
    store = await open_progress_store(kind, UNTOUCHED, {}, writes=False)
    assert isinstance(store, PgProgressStore)
