"""The parts one cache's backfill is built from, assembled once and handed to the pipeline.

``cache_parts`` makes them in dependency order: the counters (``CacheProgress``) and the upload
limit (``UPLOAD_LIMITS``: fixed AIMD, or tuned by the uploads' completions), the
``StorageCaller`` every other part reaches storage through (retries, counts, throttling fed back
to the limit), the row action of the run's mode, the ``PageSource`` (listing, bucket index,
extra objects when the action looks for them), the walk's position (``WalkProgress``) and the
``ProgressSaver`` that records it under the walk's identity. Nothing is opened: the parts use
the services context's pool and S3 client, shared by every cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from layer_cache.concurrency import ConcurrencyMode, TunedLimit, UploadLimit
from layer_cache.pg import PgLayer
from layer_cache.rate_limit import UploadPacer
from layer_cache.retry import AdaptiveLimit
from layer_cache.s3 import S3Layer
from migrations_mode.checkpoint import CheckpointTracker
from migrations_mode.config import BackfillConfig, VerifyMode
from migrations_mode.differences import DifferenceReport
from migrations_mode.page_source import ExtraObjects, PageSource
from migrations_mode.progress import BackfillMetrics, CacheProgress
from migrations_mode.progress_saver import ProgressSaver, WalkProgress
from migrations_mode.progress_store import ProgressKey, ProgressStore, WalkPurpose, progress_target
from migrations_mode.row_action import RowAction, row_action
from migrations_mode.storage_caller import StorageCaller

UPLOAD_LIMITS: dict[ConcurrencyMode, Callable[[int], UploadLimit]] = {
    ConcurrencyMode.FIXED: AdaptiveLimit,
    ConcurrencyMode.TUNED: TunedLimit,
}


@dataclass(frozen=True)
class CacheParts:
    """What one cache's pipeline works with."""

    pg: PgLayer
    s3: S3Layer
    progress: CacheProgress
    upload_limit: UploadLimit
    storage: StorageCaller
    action: RowAction
    source: PageSource
    walk: WalkProgress
    saver: ProgressSaver


def progress_key(config: BackfillConfig, pg: PgLayer, s3: S3Layer) -> ProgressKey:
    """The identity the walk's progress is saved under (cache, cutoff, order, target, shard,
    and whether it copies or repairs)."""
    return ProgressKey(
        pg.spec.cache_type,
        config.cutoff,
        order=config.order,
        target=progress_target(s3.client.meta.endpoint_url, s3.bucket, s3.key_prefix),
        shard=config.shard.label,
        purpose=WalkPurpose.REPAIR if config.verify is VerifyMode.REPAIR else WalkPurpose.COPY,
    )


def cache_parts(
    *,
    pg: PgLayer,
    s3: S3Layer,
    config: BackfillConfig,
    metrics: BackfillMetrics,
    progress_store: ProgressStore,
    report: DifferenceReport,
    pacer: UploadPacer | None = None,
) -> CacheParts:
    """Build one cache's parts (``pacer``: the process's rate limits; None, no limit)."""
    cache_type = pg.spec.cache_type
    progress = CacheProgress(cache_type, metrics)
    upload_limit = UPLOAD_LIMITS[config.concurrency](config.max_concurrent_uploads)
    storage = StorageCaller(
        cache_type, policy=config.retry_policy, progress=progress, upload_limit=upload_limit
    )
    action = row_action(
        config.verify,
        progress=progress,
        s3=s3,
        storage=storage,
        report=report,
        pacer=pacer or UploadPacer(),
    )
    source = PageSource(
        pg=pg,
        s3=s3,
        config=config,
        storage=storage,
        with_md5=action.needs_md5,
        extra=ExtraObjects(report, progress) if action.counts_extra else None,
    )
    walk = WalkProgress(CheckpointTracker(config.cutoff))
    saver = ProgressSaver(
        progress_store,
        progress_key(config, pg, s3),
        walk=walk,
        storage=storage,
        writes=action.writes,
        restart=config.restart,
        batch_size=config.key_batch_size,
    )
    return CacheParts(pg, s3, progress, upload_limit, storage, action, source, walk, saver)
