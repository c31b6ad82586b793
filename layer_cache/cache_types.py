"""The registry of layer cache types: name → table, bucket, key strategy, backfillable, sort key.

Every other part looks a cache up here instead of dispatching on its name. The CLI names are the
upstream ones (singular, e.g. ``workspace_snapshot``); tables and bucket names follow the table.
``sort_key`` is the constant upstream's ``db/*.rs`` writes into every row of the cache's table
(``cas`` → ``"cas"``, ``workspace_snapshots`` → ``"workspace_snapshot"``, ``change_batches`` →
``"change_batches"``: upstream's own mix of singular and plural, kept as it is).
``write_event_kind`` and ``evict_event_kind`` are upstream's ``LayeredEventKind`` of the cache's
writes and evicts (snake case, as its metrics' ``event_kind`` attribute says them).
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
    write_event_kind: str
    """Upstream's event kind of a write to this cache (``cas_insertion``, ``snapshot_write``…)."""
    evict_event_kind: str | None
    """Upstream's event kind of an evict; None where upstream has no evict (``db/*.rs``): cas,
    encrypted secrets and func runs."""

    @property
    def evictable(self) -> bool:
        """Upstream has an evict for it."""
        return self.evict_event_kind is not None


def _spec(
    cache_type: CacheType,
    table: str,
    sort_key: str,
    write_event_kind: str,
    evict_event_kind: str | None,
    *,
    backfillable: bool = True,
) -> CacheSpec:
    strategy = KeyStrategy.PASSTHROUGH if backfillable else KeyStrategy.REVERSE_KEY
    return CacheSpec(
        cache_type, table, strategy, backfillable, sort_key, write_event_kind, evict_event_kind
    )


CACHE_SPECS: Mapping[CacheType, CacheSpec] = MappingProxyType(
    {
        spec.cache_type: spec
        for spec in (
            _spec(CacheType.CAS, "cas", "cas", "cas_insertion", None),
            _spec(
                CacheType.WORKSPACE_SNAPSHOT,
                "workspace_snapshots",
                "workspace_snapshot",
                "snapshot_write",
                "snapshot_evict",
            ),
            _spec(
                CacheType.ENCRYPTED_SECRET,
                "encrypted_secrets",
                "encrypted_secret",
                "encrypted_secret_insertion",
                None,
            ),
            _spec(
                CacheType.REBASE_BATCH,
                "rebase_batches",
                "rebase_batches",
                "rebase_batch_write",
                "rebase_batch_evict",
            ),
            _spec(
                CacheType.CHANGE_BATCH,
                "change_batches",
                "change_batches",
                "change_batch_write",
                "change_batch_evict",
            ),
            # Upstream's split snapshot graphs write and evict as snapshots do.
            _spec(
                CacheType.SPLIT_SNAPSHOT_SUBGRAPH,
                "split_snapshot_subgraphs",
                "split_snapshot_subgraph",
                "snapshot_write",
                "snapshot_evict",
            ),
            _spec(
                CacheType.SPLIT_SNAPSHOT_SUPERGRAPH,
                "split_snapshot_supergraphs",
                "split_snapshot_supergraph",
                "snapshot_write",
                "snapshot_evict",
            ),
            _spec(
                CacheType.SPLIT_SNAPSHOT_REBASE_BATCH,
                "split_snapshot_rebase_batches",
                "split_snapshot_rebase_batches",
                "split_rebase_batch_write",
                "split_rebase_batch_evict",
            ),
            # func runs are moving out of the layer cache: never backfilled. Upstream keys their
            # rows by workspace (sort_key = the workspace pk); this service never writes them.
            _spec(CacheType.FUNC_RUN, "func_runs", "", "func_run_write", None, backfillable=False),
            _spec(
                CacheType.FUNC_RUN_LOG,
                "func_run_logs",
                "",
                "func_run_log_write",
                None,
                backfillable=False,
            ),
        )
    }
)

BACKFILLABLE_CACHE_TYPES: tuple[CacheType, ...] = tuple(
    spec.cache_type for spec in CACHE_SPECS.values() if spec.backfillable
)
