"""The registry of layer cache types: name → table, bucket, key strategy, backfillable, sort key.

Every other part looks a cache up here instead of dispatching on its name. The CLI names are the
upstream ones (singular, e.g. ``workspace_snapshot``); tables and bucket names follow the table.
``sort_key`` is the constant upstream's ``db/*.rs`` writes into every row of the cache's table
(``cas`` → ``"cas"``, ``workspace_snapshots`` → ``"workspace_snapshot"``, ``change_batches`` →
``"change_batches"``: upstream's own mix of singular and plural, kept as it is).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType


class KeyStrategy(StrEnum):
    """How a row key becomes the object key's base before prefixing."""

    PASSTHROUGH = "passthrough"
    REVERSE_KEY = "reverse_key"


class CacheType(StrEnum):
    """Every layer cache, by the name operators use on the command line."""

    CAS = "cas"
    WORKSPACE_SNAPSHOT = "workspace_snapshot"
    ENCRYPTED_SECRET = "encrypted_secret"
    REBASE_BATCH = "rebase_batch"
    CHANGE_BATCH = "change_batch"
    SPLIT_SNAPSHOT_SUBGRAPH = "split_snapshot_subgraph"
    SPLIT_SNAPSHOT_SUPERGRAPH = "split_snapshot_supergraph"
    SPLIT_SNAPSHOT_REBASE_BATCH = "split_snapshot_rebase_batch"
    FUNC_RUN = "func_run"
    FUNC_RUN_LOG = "func_run_log"


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """Where one cache type lives in Postgres and S3."""

    cache_type: CacheType
    table: str
    key_strategy: KeyStrategy
    backfillable: bool
    sort_key: str
    """The ``sort_key`` column upstream writes for every row of this cache."""
    evictable: bool = True
    """Upstream has an evict for it (``db/*.rs``): not cas, encrypted secrets or func runs."""


def _spec(
    cache_type: CacheType,
    table: str,
    sort_key: str,
    *,
    backfillable: bool = True,
    evictable: bool = True,
) -> CacheSpec:
    strategy = KeyStrategy.PASSTHROUGH if backfillable else KeyStrategy.REVERSE_KEY
    return CacheSpec(cache_type, table, strategy, backfillable, sort_key, evictable)


CACHE_SPECS: Mapping[CacheType, CacheSpec] = MappingProxyType(
    {
        spec.cache_type: spec
        for spec in (
            _spec(CacheType.CAS, "cas", "cas", evictable=False),
            _spec(CacheType.WORKSPACE_SNAPSHOT, "workspace_snapshots", "workspace_snapshot"),
            _spec(
                CacheType.ENCRYPTED_SECRET, "encrypted_secrets", "encrypted_secret", evictable=False
            ),
            _spec(CacheType.REBASE_BATCH, "rebase_batches", "rebase_batches"),
            _spec(CacheType.CHANGE_BATCH, "change_batches", "change_batches"),
            _spec(
                CacheType.SPLIT_SNAPSHOT_SUBGRAPH,
                "split_snapshot_subgraphs",
                "split_snapshot_subgraph",
            ),
            _spec(
                CacheType.SPLIT_SNAPSHOT_SUPERGRAPH,
                "split_snapshot_supergraphs",
                "split_snapshot_supergraph",
            ),
            _spec(
                CacheType.SPLIT_SNAPSHOT_REBASE_BATCH,
                "split_snapshot_rebase_batches",
                "split_snapshot_rebase_batches",
            ),
            # func runs are moving out of the layer cache: never backfilled. Upstream keys their
            # rows by workspace (sort_key = the workspace pk); this service never writes them.
            _spec(CacheType.FUNC_RUN, "func_runs", "", backfillable=False, evictable=False),
            _spec(CacheType.FUNC_RUN_LOG, "func_run_logs", "", backfillable=False, evictable=False),
        )
    }
)

BACKFILLABLE_CACHE_TYPES: tuple[CacheType, ...] = tuple(
    spec.cache_type for spec in CACHE_SPECS.values() if spec.backfillable
)
