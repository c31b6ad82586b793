"""One storage call of a cache's backfill, under its retry policy, counted, throttling fed back.

``StorageCaller`` is how every part of one cache's backfill reaches Postgres and S3: the pipeline
(``cache_backfill``), the page source, the row actions and the progress saver all get the same
caller and ``await caller(call, key=…)``. It runs ``call`` under ``call_with_retries`` with the
run's ``RetryPolicy``; each retry is counted (``CacheProgress.retried``, metric
``layer_cache.backfill.retries``) and logged (``retrying storage call``, with the key when there
is one), a throttle is fed to the cache's upload limit (``record_throttle``) and a success too
(``record_success``). A call that still fails is counted (``…errors``) and raised as
``CacheBackfillFailed`` naming the cache, the key and the cause. Nothing here holds a resource: a
cancelled call stops in its backoff sleep.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass
from typing import Protocol, TypeVar

import structlog

from layer_cache.cache_types import CacheType
from layer_cache.concurrency import UploadLimit
from layer_cache.errors import CacheBackfillFailed, ErrorKind, StorageError
from layer_cache.retry import RetryPolicy, call_with_retries
from migrations_mode.progress import CacheProgress

log = structlog.get_logger(__name__)

T = TypeVar("T")


class StorageCall(Protocol):
    """What the parts of a cache's backfill call storage through (``StorageCaller``)."""

    async def __call__(self, call: Callable[[], Awaitable[T]], *, key: str | None = None) -> T:
        """The call's result; raises ``CacheBackfillFailed`` once retries are exhausted."""


@dataclass
class StorageCaller:
    """Storage calls of one cache: retried within ``policy``, counted, fed to ``upload_limit``."""

    cache_type: CacheType
    _: KW_ONLY
    policy: RetryPolicy
    progress: CacheProgress
    upload_limit: UploadLimit

    async def __call__(self, call: Callable[[], Awaitable[T]], *, key: str | None = None) -> T:
        """``call``'s result; ``CacheBackfillFailed`` once the retries are spent."""

        def on_retry(exc: StorageError, attempt: int, delay_s: float) -> None:
            self.progress.retried(exc.kind.value)
            if exc.kind is ErrorKind.THROTTLED:
                self.upload_limit.record_throttle()
            log.warning(
                "retrying storage call",
                error_class=exc.kind.value,
                attempt=attempt,
                delay_s=round(delay_s, 3),
                key=key,
                error=str(exc),
                upload_concurrency_limit=self.upload_limit.limit,
            )

        try:
            result = await call_with_retries(call, self.policy, on_retry=on_retry)
        except StorageError as exc:
            self.progress.failed(exc.kind.value)
            raise CacheBackfillFailed(self.cache_type, key, exc) from exc
        self.upload_limit.record_success()
        return result
