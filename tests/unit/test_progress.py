"""CacheProgress: each count reaches its OTel counter, in batches, and never twice."""

from __future__ import annotations

from layer_cache.cache_types import CacheType
from migrations_mode.progress import EXPORT_EVERY_ROWS, CacheProgress
from tests.unit.backfill_fakes import counter_values, metrics_reader

PER_ROW_COUNTERS = (
    "items_processed",
    "items_uploaded",
    "items_skipped",
    "bytes_uploaded",
    "items_repaired",
    "items_vanished",
)


def test_each_count_reaches_its_counter_once_when_the_cache_finishes() -> None:
    metrics, reader = metrics_reader()
    progress = CacheProgress(CacheType.CAS, metrics)

    progress.uploaded(100, repaired=False)
    progress.uploaded(40, repaired=True)
    progress.skipped()
    progress.vanished()
    progress.finish()
    progress.finish()  # nothing new to add the second time

    exported = {
        name: counter_values(reader, f"layer_cache.backfill.{name}")["None"]
        for name in PER_ROW_COUNTERS
    }
    assert exported == {
        "items_processed": 4,
        "items_uploaded": 2,
        "items_skipped": 1,
        "bytes_uploaded": 140,
        "items_repaired": 1,
        "items_vanished": 1,
    }


def test_counts_are_exported_once_a_batch_of_rows_has_finished() -> None:
    metrics, reader = metrics_reader()
    progress = CacheProgress(CacheType.CAS, metrics)

    def exported(name: str) -> float:
        return counter_values(reader, f"layer_cache.backfill.{name}")["None"]

    for _ in range(EXPORT_EVERY_ROWS - 1):
        progress.skipped()
    assert exported("items_processed") == 0  # every series starts at zero
    progress.skipped()
    assert exported("items_processed") == EXPORT_EVERY_ROWS
    assert exported("items_skipped") == EXPORT_EVERY_ROWS
    assert exported("items_uploaded") == 0
