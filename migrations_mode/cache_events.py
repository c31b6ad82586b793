"""The log events of one cache's backfill, with upstream's names and fields on upstream's events.

``CacheEvents`` writes them from what the pipeline hands over, so every event of a cache carries
the same counts (``counts``) and each field means what ``log_fields`` says: ``starting backfill``
(upstream's, with ``max_concurrent``), ``backfill checkpoint`` (upstream's ``active_uploads``),
``completed backfill``, and on a stop ``backfill shutting down gracefully`` (upstream's
``in_flight_uploads``, when a signal asked for it) or ``backfill stopped`` (cancelled, failed),
each with where and how to resume (``resume_flag``). Levels: every event here is ``info``. It
holds nothing but the names it logs under.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from layer_cache.concurrency import UploadLimit
from migrations_mode.checkpoint import Position
from migrations_mode.config import BackfillConfig, format_checkpoint
from migrations_mode.progress import CacheStats

log = structlog.get_logger("migrations_mode.cache_backfill")


def resume_flag(checkpoint: datetime) -> str:
    """The exact flag that resumes from a checkpoint."""
    return f"--backfill-cutoff-timestamp '{format_checkpoint(checkpoint)}'"


def counts(stats: CacheStats) -> dict[str, int]:
    """This run's counts, as every per-cache event carries them (``log_fields``)."""
    return {
        "processed": stats.processed,
        "uploaded": stats.uploaded,
        "skipped": stats.skipped,
        "repaired": stats.repaired,
        "vanished": stats.vanished,
        "bytes_uploaded": stats.bytes_uploaded,
        "retried": sum(stats.retries.values()),
    }


class CacheEvents:
    """The events of one cache's walk."""

    def __init__(self, config: BackfillConfig, *, bucket: str, progress_store: str) -> None:
        self.config = config
        self.bucket = bucket
        self.progress_store = progress_store

    def already_complete(self, stats: CacheStats) -> None:
        """Saved progress said the walk was done: nothing ran."""
        log.info(
            "completed backfill",
            already_complete=True,
            progress_store=self.progress_store,
            **counts(stats),
        )

    def starting(self, resume_after: Position | None) -> None:
        config = self.config
        log.info(
            "starting backfill",
            cutoff_timestamp=format_checkpoint(config.cutoff),
            max_concurrent=config.max_concurrent_uploads,
            concurrency=config.concurrency.value,
            key_batch_size=config.key_batch_size,
            bucket=self.bucket,
            resume_after_key=resume_after.key if resume_after else None,
        )

    def checkpoint(self, checkpoint: datetime, limit: UploadLimit, stats: CacheStats) -> None:
        log.info(
            "backfill checkpoint",
            checkpoint_timestamp=format_checkpoint(checkpoint),
            active_uploads=limit.in_use,  # upstream's name on upstream's event
            upload_concurrency_limit=limit.limit,
            **counts(stats),
        )

    def outcome(
        self,
        outcome: str,
        *,
        signalled: bool,
        checkpoint: datetime,
        limit: UploadLimit,
        rows_pending: int,
        stats: CacheStats,
    ) -> None:
        """How the walk ended: completed, or stopped (by a signal, or cancelled or failed) with
        where it resumes."""
        if outcome == "completed":
            log.info("completed backfill", already_complete=False, **counts(stats))
            return
        where = {
            "reason": outcome,
            "rows_pending": rows_pending,
            "progress_store": self.progress_store,
            "resume_with": resume_flag(checkpoint),
        }
        if signalled:  # upstream's event, with upstream's field
            log.info(
                "backfill shutting down gracefully",
                checkpoint_timestamp=format_checkpoint(checkpoint),
                in_flight_uploads=limit.in_use,
                **where,
                **counts(stats),
            )
        else:
            log.info(
                "backfill stopped",
                checkpoint_timestamp=format_checkpoint(checkpoint),
                uploads_in_flight=limit.in_use,
                **where,
                **counts(stats),
            )
