"""The backfill's branch of the error tree."""

from __future__ import annotations

from layer_cache.cache_types import CacheType
from layer_cache.errors import LayerCacheError, StorageError


class BackfillError(LayerCacheError):
    """Anything that stops a backfill."""


class BackfillConfigError(BackfillError):
    """An option is missing or invalid; raised before any connection is opened."""


class PreflightError(BackfillError):
    """The environment is not ready: a table, bucket, permission or credential is missing."""


class CacheBackfillFailed(BackfillError):
    """One cache's backfill failed; the run stops and names the cache, key and cause."""

    def __init__(self, cache_type: CacheType, key: str | None, cause: StorageError) -> None:
        where = f"cache {cache_type}" + (f" at key {key}" if key else "")
        super().__init__(f"{where}: {cause}")
        self.cache_type = cache_type
        self.key = key
        self.cause = cause


def first_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of a (possibly nested) exception group, which task groups raise."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
