"""Upstream's read and write series of the layer cache, with upstream's names, attributes and
values (``layer_cache.rs``, ``persister.rs``, ``pg.rs``, ``s3.rs``, ``s3_worker.rs``), recorded by
``CachePersister`` (the backends), ``TieredPersister`` and ``CacheTier`` (the tier, upstream's
foyer cache: ``backend="foyer"``) and the durable queues (``layer_cache.write_queue``).

Every series carries ``cache_name`` (the table, as upstream). Prometheus names (counters end in
``_total``, histograms in ``_bucket``/``_sum``/``_count``; see ``layer_cache.instruments``):

* reads: ``layer_cache_requests_total`` per key asked for (a GET, each key of a bulk read);
  ``layer_cache_request_latency_ms{result}`` per GET, end to end (upstream measures single gets
  only); ``layer_cache_read_latency_ms{backend,result}`` per lookup in the tier and per backend
  read, one sample per result the call had (a bulk read of 1,000 keys is one call, timed once,
  not 1,000 samples: each costs ~10 µs of CPU here); ``layer_cache_backend_resolved_total
  {backend,result}`` per key: the tier's hits, and each backend read's hits and misses (as
  upstream, a tier miss is not counted there: "not found" means no backend had it);
  ``layer_cache_read_fallback_total{from_backend,to_backend}`` per key read from the next backend
  after a miss or a failed read (S3Primary: ``s3`` → ``postgres``).
* writes: ``layer_cache_persister_write_attempted{backend,event_kind}`` per PUT (an up-down
  counter, as upstream: Prometheus keeps the name; ``backend`` the mode's primary, the first it
  reads); per target, ``layer_cache_persister_write_success{backend}`` (S3 in DualWrite and
  S3Primary: once durably queued, as upstream), or ``…_write_failed_retryable`` /
  ``…_write_failed_permanent`` ``{backend,event_kind,error_kind}`` (retryable: a fault worth
  retrying or one an operator fixes); ``layer_cache_persister_write_duration_ms
  {backend,status,event_kind}`` per write to a backend (the queues' attempts too);
  ``layer_cache_persistence_latency_seconds{backend,operation,event_kind}`` from the request to
  the value on the backend (``operation``: ``write``, ``retry`` for the Postgres retry queue,
  ``evict``); ``layer_cache_persister_pg_error{operation,backend,event_kind}`` per Postgres write
  on the request path or evict that failed, and ``layer_cache_persister_event_by_kind
  {event_kind,backend}`` per Postgres write on the request path (up-down counters, as upstream).

The three write counters upstream's dashboard also queries without ``_total`` are
``UpstreamCounter`` s with the bare name too. ``event_kind`` is upstream's ``LayeredEventKind``
(``CacheSpec.write_event_kind``/``evict_event_kind``; ``raw`` for a read-through write-back).
``PersisterMetrics()`` without a meter records nothing (unit tests, the bench's in-process
persisters).
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.metrics import Meter, NoOpMeter

from layer_cache.errors import StorageError
from layer_cache.instruments import UpstreamCounter, ms_histogram, seconds_histogram

TIER_BACKEND = "foyer"
"""Upstream's name for its memory and disk cache, which its dashboard filters on."""
FILL_EVENT_KIND = "raw"
"""Upstream's event kind of a read-through write-back (``LayeredEventKind::Raw``)."""

REQUESTS_METRIC = "layer_cache_requests_total"
REQUEST_LATENCY_METRIC = "layer_cache_request_latency_ms"
READ_LATENCY_METRIC = "layer_cache_read_latency_ms"
RESOLVED_METRIC = "layer_cache_backend_resolved"
FALLBACK_METRIC = "layer_cache_read_fallback"
WRITE_ATTEMPTED_METRIC = "layer_cache_persister_write_attempted"
WRITE_SUCCESS_METRIC = "layer_cache_persister_write_success"
WRITE_FAILED_RETRYABLE_METRIC = "layer_cache_persister_write_failed_retryable"
WRITE_FAILED_PERMANENT_METRIC = "layer_cache_persister_write_failed_permanent"
WRITE_DURATION_METRIC = "layer_cache_persister_write_duration_ms"
PERSISTENCE_LATENCY_METRIC = "layer_cache_persistence_latency_seconds"
PG_ERROR_METRIC = "layer_cache_persister_pg_error"
EVENT_BY_KIND_METRIC = "layer_cache_persister_event_by_kind"

HIT, MISS = "hit", "miss"
POSTGRES = "postgres"


def retryable(failure: BaseException) -> bool:
    """A failed write worth another attempt: a transient fault, or one an operator fixes."""
    return isinstance(failure, StorageError) and (
        failure.kind.retryable or failure.kind.needs_operator
    )


def error_kind(failure: BaseException) -> str:
    """The ``error_kind`` attribute of a failed write: our ``ErrorKind``, or ``internal``."""
    return failure.kind.value if isinstance(failure, StorageError) else "internal"


class PersisterMetrics:
    """The instruments, created once per meter (the SDK hands the same ones to a second
    ``PersisterMetrics`` of that meter), and what each event records."""

    def __init__(self, meter: Meter | None = None) -> None:
        meter = NoOpMeter("layer_cache.persister") if meter is None else meter
        self._requests = meter.create_counter(
            REQUESTS_METRIC, description="keys asked for: each GET, each key of a bulk read"
        )
        self._request_latency = ms_histogram(
            meter, REQUEST_LATENCY_METRIC, "time to answer a GET, tier and backends included"
        )
        self._read_latency = ms_histogram(
            meter, READ_LATENCY_METRIC, "time of one lookup in the tier or read of a backend"
        )
        self._resolved = meter.create_counter(
            RESOLVED_METRIC, description="keys the tier had, and backend reads' hits and misses"
        )
        self._fallback = meter.create_counter(
            FALLBACK_METRIC, description="keys read from the next backend after a miss or failure"
        )
        self._write_attempted = meter.create_up_down_counter(
            WRITE_ATTEMPTED_METRIC, description="PUTs received"
        )
        self._write_success = UpstreamCounter(
            meter,
            WRITE_SUCCESS_METRIC,
            description="writes a backend took (or its durable queue, for a deferred one)",
            bare_too=True,
        )
        self._write_failed_retryable = UpstreamCounter(
            meter,
            WRITE_FAILED_RETRYABLE_METRIC,
            description="writes that failed with a fault worth retrying or an operator fixes",
            bare_too=True,
        )
        self._write_failed_permanent = UpstreamCounter(
            meter,
            WRITE_FAILED_PERMANENT_METRIC,
            description="writes that failed with an error no retry fixes",
            bare_too=True,
        )
        self._write_duration = ms_histogram(
            meter, WRITE_DURATION_METRIC, "time of one write to a backend"
        )
        self._persistence_latency = seconds_histogram(
            meter,
            PERSISTENCE_LATENCY_METRIC,
            "time from the request to the value written on (or evicted from) a backend",
        )
        self._pg_error = meter.create_up_down_counter(
            PG_ERROR_METRIC, description="Postgres writes and evicts that failed"
        )
        self._event_by_kind = meter.create_up_down_counter(
            EVENT_BY_KIND_METRIC, description="Postgres writes, by upstream's event kind"
        )

    # ---------------------------------------------------------------------------------------
    # Reads

    def requested(self, cache_name: str, keys: int) -> None:
        if keys > 0:
            self._requests.add(keys, {"cache_name": cache_name})

    def answered(self, cache_name: str, *, found: bool, elapsed_s: float) -> None:
        """One GET answered (a value, or not found)."""
        self._request_latency.record(
            elapsed_s * 1000, {"cache_name": cache_name, "result": HIT if found else MISS}
        )

    def looked_up(
        self,
        cache_name: str,
        backend: str,
        *,
        hits: int,
        misses: int,
        elapsed_s: float,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        """One lookup in the tier or read of a backend for ``hits + misses`` keys: its time once
        per result it had, its keys counted (a failed read is neither: nothing is recorded for
        its keys)."""
        for result, keys in ((HIT, hits), (MISS, misses)):
            if keys <= 0:
                continue
            attributes = {"cache_name": cache_name, "backend": backend, "result": result}
            attributes |= extra or {}
            self._read_latency.record(elapsed_s * 1000, attributes)
            if result == HIT or backend != TIER_BACKEND:
                self._resolved.add(keys, attributes)

    def fell_back(self, cache_name: str, from_backend: str, to_backend: str, keys: int) -> None:
        if keys > 0:
            self._fallback.add(
                keys,
                {"cache_name": cache_name, "from_backend": from_backend, "to_backend": to_backend},
            )

    # ---------------------------------------------------------------------------------------
    # Writes and evicts

    def write_attempted(self, cache_name: str, backend: str, event_kind: str) -> None:
        self._write_attempted.add(
            1, {"cache_name": cache_name, "backend": backend, "event_kind": event_kind}
        )

    def wrote(
        self,
        cache_name: str,
        backend: str,
        event_kind: str,
        *,
        elapsed_s: float,
        failure: BaseException | None,
    ) -> None:
        """One write to a backend ended (on the request path or from a queue)."""
        status = "success" if failure is None else "error"
        self._write_duration.record(
            elapsed_s * 1000,
            {
                "cache_name": cache_name,
                "status": status,
                "backend": backend,
                "event_kind": event_kind,
            },
        )

    def write_succeeded(self, cache_name: str, backend: str, event_kind: str) -> None:
        """A write on the request path: the backend (or its durable queue) took it."""
        self._write_success.add(1, {"cache_name": cache_name, "backend": backend})
        self._by_kind(cache_name, backend, event_kind)

    def write_failed(
        self, cache_name: str, backend: str, event_kind: str, failure: BaseException
    ) -> None:
        """A write on the request path failed (after the request's retries)."""
        counter = (
            self._write_failed_retryable if retryable(failure) else self._write_failed_permanent
        )
        counter.add(
            1,
            {
                "cache_name": cache_name,
                "backend": backend,
                "event_kind": event_kind,
                "error_kind": error_kind(failure),
            },
        )
        self._by_kind(cache_name, backend, event_kind)
        if backend == POSTGRES:
            self._pg_error.add(
                1,
                {
                    "cache_name": cache_name,
                    "operation": "write",
                    "backend": backend,
                    "event_kind": event_kind,
                },
            )

    def _by_kind(self, cache_name: str, backend: str, event_kind: str) -> None:
        if backend == POSTGRES:
            self._event_by_kind.add(
                1, {"cache_name": cache_name, "event_kind": event_kind, "backend": backend}
            )

    def persisted(
        self, cache_name: str, backend: str, operation: str, event_kind: str, latency_s: float
    ) -> None:
        """A value reached (or, ``operation="evict"``, left) a backend ``latency_s`` after the
        request that asked for it."""
        self._persistence_latency.record(
            max(0.0, latency_s),
            {
                "cache_name": cache_name,
                "backend": backend,
                "operation": operation,
                "event_kind": event_kind,
            },
        )

    def evict_failed(self, cache_name: str, event_kind: str) -> None:
        """A Postgres delete of the evict route failed."""
        self._pg_error.add(
            1,
            {
                "cache_name": cache_name,
                "operation": "evict",
                "backend": POSTGRES,
                "event_kind": event_kind,
            },
        )
