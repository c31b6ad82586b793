"""The backfill's log vocabulary: one field name per quantity, meaning the same in every event.

Upstream's events keep upstream's names and fields, so a JSON-lines consumer written for sdf's
backfill keeps working (``UPSTREAM_EVENTS``). Upstream names the uploads running now two ways,
``active_uploads`` on ``backfill checkpoint`` and ``in_flight_uploads`` on ``backfill shutting
down gracefully``; those two events keep them, and every other event says ``uploads_in_flight``:
the name of the gauge that measures it (``layer_cache.backfill.uploads_in_flight``), so a log line
and a dashboard use one word. For the same reason the limit in force is
``upload_concurrency_limit``, as its gauge. Fields we add to upstream's events follow ``FIELDS``.

Quantities that differ have names that say how, used the same way everywhere:
  * a count without a qualifier is this run's, like upstream's counters (``processed``,
    ``uploaded``, ``skipped``, …); ``rows_done_all_runs`` and ``rows_done_earlier_runs`` count
    the runs a resumed walk continues (rows finished in walk order);
  * ``max_concurrent`` is the ceiling on uploads in flight (``--backfill-max-concurrent-uploads``,
    upstream's field), ``upload_concurrency_limit`` the limit in force now (tuned below the
    ceiling, or halved while S3 throttles);
  * ``rows_per_s`` is a run's average (the summary), ``recent_rows_per_s`` the rate over the last
    minute (progress); a cache whose saved progress said complete did nothing and has none (null).

``RETIRED`` maps the names no event uses any more to the one that replaced them. Nothing here
runs: the tables are what the tests hold every backfill log call to, and what the docs list.
"""

from __future__ import annotations

# Upstream's events and the fields upstream gives them (lib/sdf-server/src/layer_cache_backfill).
UPSTREAM_EVENTS: dict[str, tuple[str, ...]] = {
    "starting backfill": ("cache_type", "cutoff_timestamp", "max_concurrent"),
    "backfill checkpoint": ("cache_type", "checkpoint_timestamp", "active_uploads"),
    "backfill shutting down gracefully": (
        "cache_type",
        "checkpoint_timestamp",
        "in_flight_uploads",
    ),
    "completed backfill": ("cache_type",),
    "starting backfill for all cache types": ("cache_count", "cache_types"),
    "completed backfill for all cache types": (),
}

# Upstream's own names for ``uploads_in_flight``, each allowed only on its upstream event.
UPSTREAM_SYNONYMS: dict[str, str] = {
    "active_uploads": "backfill checkpoint",
    "in_flight_uploads": "backfill shutting down gracefully",
}

RETIRED: dict[str, str] = {
    "upload_limit": "upload_concurrency_limit",
    "rows_done": "rows_done_all_runs",
    "rows_done_before": "rows_done_earlier_runs",
    "checked": "processed",
    "cause": "error",
    "size": "object_size or row_size",
}

# Every field of every backfill event (besides ``event``, ``level`` and ``timestamp``).
FIELDS: dict[str, str] = {
    # What and where
    "cache_type": "the cache (CLI name); 'total' on the run's summary",
    "cache_types": "the caches of the run",
    "cache_count": "how many caches the run walks",
    "bucket": "the cache's bucket",
    "key": "a row's key",
    "object_key": "the S3 key of a row's object",
    "cutoff_timestamp": "rows created before this instant are copied",
    "database_now": "the database's clock when the run started",
    "checkpoint_timestamp": "the cutoff that resumes this cache without loss",
    "resume_after_key": "the saved position the walk starts after (key order)",
    "resume_with": "the flag that resumes from the checkpoint",
    "manual_resume_with": "flags resuming every unfinished cache from one checkpoint",
    "resume": "how to resume (saved progress)",
    "progress_store": "where progress is saved: postgres or s3",
    # Settings in force
    "max_concurrent": "ceiling on uploads in flight per cache (--backfill-max-concurrent-uploads)",
    "concurrency": "tuned or fixed",
    "key_batch_size": "rows listed per query",
    "max_uploads_per_second": "the process's cap on PUTs a second (null: none)",
    "max_bytes_per_second": "the process's cap on bytes uploaded a second (null: none)",
    "metrics": "where metrics go",
    "grace_period_s": "seconds in-flight uploads get after a stop request",
    "order": "walk order of this run",
    "target": "endpoint, bucket and key prefix the progress belongs to",
    "shard": "this process's shard, as index-of-count",
    # The run's counts (this run's)
    "processed": "rows finished this run (copied, skipped, vanished or compared)",
    "uploaded": "rows PUT to S3 this run",
    "skipped": "rows whose object was already there with their size, this run",
    "repaired": "objects re-uploaded over a wrong one this run (a difference: whether it was)",
    "vanished": "rows deleted between listing and reading, this run",
    "bytes_uploaded": "value bytes PUT this run",
    "retried": "storage calls retried this run",
    "retries_by_class": "retried, by error class",
    "verified": "rows whose object matched (verify, repair)",
    "missing": "rows with no object (verify, repair)",
    "mismatched": "rows whose object has another size or content (verify, repair)",
    "extra": "objects with no row (verify)",
    "differences": "missing + mismatched + extra",
    # Progress of the walk
    "rows_done_all_runs": "rows finished in walk order, this run and the runs it resumes",
    "rows_done_earlier_runs": "rows finished by the runs this one resumes",
    "rows_total_estimate": "rows the cache's walk covers, estimated",
    "rows_remaining_estimate": "rows left to walk, estimated",
    "percent_complete": "share of the cache's walk done, all runs",
    "rows_pending": "rows listed and not finished when the walk stopped",
    "uploads_in_flight": "uploads running now (upstream's two events name it otherwise)",
    "active_uploads": "uploads running now: upstream's name, on 'backfill checkpoint'",
    "in_flight_uploads": "uploads running now: upstream's name, on its graceful shutdown event",
    "upload_concurrency_limit": "the limit on uploads in flight now (tuned, throttled)",
    "recent_rows_per_s": "rows processed a second over the last minute",
    "rows_per_s": "rows processed a second over the run (null: the cache was already complete)",
    "eta_s": "seconds to go at the recent rate (null: unknown)",
    "elapsed_s": "seconds the cache (the total: the longest) ran",
    "status": "running or completed (progress); how the walk ended (summary)",
    "already_complete": "saved progress said complete: nothing ran this run",
    "completed_caches": "caches that finished",
    "incomplete_caches": "caches that did not finish",
    # Faults
    "error_class": "what kind of fault: throttled, transient, access_denied, …",
    "error": "the fault, as one line",
    "failed_cache_type": "the cache whose failure ended the run",
    "attempt": "which attempt of the call failed",
    "delay_s": "seconds before the next attempt",
    "reason": "why, in words (on the shutdown events: stopped or failed)",
    "note": "what the operator should know besides",
    # Verification
    "kind": "a difference: missing, size, content or extra",
    "row_size": "bytes of a row's value",
    "object_size": "bytes of an object in S3",
    "logged": "differences logged per cache before the rest are only counted",
    "report": "the differences report file (null: none)",
    "repair_with": "flags that repair the differences found",
    # Saved progress not used
    "differs": "which parameters differ from the saved progress'",
    "saved_order": "walk order the saved progress was made with",
    "saved_target": "target the saved progress was made for",
    "saved_shard": "shard the saved progress was made by",
    "records_not_used": "saved progress records left alone",
    # Pages and the dry run
    "rows": "rows of a page (fetched key batch) or below the cutoff (dry run)",
    "bytes": "value bytes below the cutoff (dry run)",
    "sampled": "rows sampled (dry run)",
    "sampled_in_s3": "sampled rows already in S3 (dry run)",
    "rows_to_upload_estimate": "rows the copy would PUT, estimated (dry run)",
    "request_latency_ms": "milliseconds per S3 request measured (dry run)",
    "client_cpu_ms_per_request": "client CPU milliseconds per request measured (dry run)",
    "estimated_s": "seconds the copy would take, estimated (dry run)",
    "bound_by": "what bounds the upload time: latency or client CPU (dry run)",
    "write_permission": "what the write probe found (dry run)",
}
