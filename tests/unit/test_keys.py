from __future__ import annotations

import pytest

from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CACHE_SPECS, CacheType, KeyStrategy
from layer_cache.keys import bucket_name, object_key


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("0123456789abcdef0123456789abcdef", "01/23/45/0123456789abcdef0123456789abcdef"),
        ("abcdef", "ab/cd/ef/abcdef"),
        ("abcde", "ab/cd/abcde"),
        ("abcd", "ab/cd/abcd"),
        ("abc", "ab/abc"),
        ("ab", "ab/ab"),
        ("a", "a"),
        ("", ""),
    ],
)
def test_object_key_uses_up_to_three_two_character_levels(key: str, expected: str) -> None:
    assert object_key(key) == expected


def test_object_key_prepends_key_prefix() -> None:
    assert object_key("abcdef12", key_prefix="test-run") == "test-run/ab/cd/ef/abcdef12"


def test_reverse_key_strategy_reverses_before_prefixing() -> None:
    assert object_key("01abcdef", key_strategy=KeyStrategy.REVERSE_KEY) == "fe/dc/ba/fedcba10"


@pytest.mark.parametrize(
    ("table", "suffix", "expected"),
    [
        ("cas", None, "si-layer-cache-cas"),
        ("workspace_snapshots", None, "si-layer-cache-workspace-snapshots"),
        (
            "split_snapshot_rebase_batches",
            "prod",
            "si-layer-cache-split-snapshot-rebase-batches-prod",
        ),
    ],
)
def test_bucket_name_replaces_underscores_and_appends_suffix(
    table: str, suffix: str | None, expected: str
) -> None:
    assert bucket_name(table, "si-layer-cache", suffix) == expected


def test_registry_has_eight_backfillable_caches_and_excludes_func_runs() -> None:
    assert [c.value for c in BACKFILLABLE_CACHE_TYPES] == [
        "cas",
        "workspace_snapshot",
        "encrypted_secret",
        "rebase_batch",
        "change_batch",
        "split_snapshot_subgraph",
        "split_snapshot_supergraph",
        "split_snapshot_rebase_batch",
    ]
    assert not CACHE_SPECS[CacheType.FUNC_RUN].backfillable
    assert CACHE_SPECS[CacheType.FUNC_RUN_LOG].key_strategy is KeyStrategy.REVERSE_KEY
    assert all(
        CACHE_SPECS[c].key_strategy is KeyStrategy.PASSTHROUGH for c in BACKFILLABLE_CACHE_TYPES
    )
