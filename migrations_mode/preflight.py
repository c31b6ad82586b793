"""Checks run after connecting and before copying: tables readable, buckets reachable, and
writable, and whether the layer database takes writes at all (a read replica does not).

Every failure becomes one ``PreflightError`` line that says what is wrong and what to change.
``explain_storage_error`` is also used by the entrypoint for failures while connecting.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum

import asyncpg

from layer_cache.cache_types import CacheType
from layer_cache.errors import (
    ErrorKind,
    PgLayerError,
    PreflightError,
    S3LayerError,
    StorageError,
    first_exception,
)
from layer_cache.pg import PgLayer, server_read_only_reason
from layer_cache.retry import RetryPolicy, call_with_retries
from layer_cache.s3 import S3Layer
from migrations_mode.progress_store import S3_PROGRESS_PREFIX

_S3_ADVICE: dict[ErrorKind, str] = {
    ErrorKind.MISSING_BUCKET: (
        "bucket {bucket} does not exist; create it or check "
        "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__BUCKET_PREFIX/__BUCKET_SUFFIX"
    ),
    ErrorKind.ACCESS_DENIED: (
        "access denied on bucket {bucket}: {operation} was refused, the credentials lack "
        "{permission}; they need s3:ListBucket, s3:GetObject and s3:PutObject on it (without "
        "s3:ListBucket, S3 answers 403 instead of 404 for a missing object)"
    ),
    ErrorKind.INVALID_CREDENTIALS: (
        "S3 rejected the credentials ({code}) for bucket {bucket}; check "
        "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__AUTH__STATIC_CREDENTIALS__ACCESS_KEY and "
        "__SECRET_KEY"
    ),
    ErrorKind.TRANSIENT: (
        "cannot reach the S3 endpoint for bucket {bucket}; check "
        "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__ENDPOINT"
    ),
    ErrorKind.THROTTLED: "S3 is throttling requests to bucket {bucket}; try again later",
    ErrorKind.UNTRUSTED_CERTIFICATE: (
        "the S3 endpoint's TLS certificate is not trusted ({detail}); set "
        "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__CA_BUNDLE to the PEM file of the CA "
        "it chains to (or AWS_CA_BUNDLE), or check __ENDPOINT"
    ),
}

# The IAM permission each S3 operation the backfill sends needs.
_S3_PERMISSIONS: dict[str, str] = {
    "ListObjectsV2": "s3:ListBucket",
    "HeadObject": "s3:GetObject",
    "GetObject": "s3:GetObject",
    "PutObject": "s3:PutObject",
    "DeleteObject": "s3:DeleteObject",
}

# Where the write check sends its PUT (a Content-MD5 that cannot match: nothing is stored),
# below the target's key prefix, where a policy limited to that prefix allows writes.
WRITE_PROBE_NAME = f"{S3_PROGRESS_PREFIX}/preflight-write-probe"

_PG_ADVICE: dict[ErrorKind, str] = {
    ErrorKind.INVALID_CREDENTIALS: (
        "Postgres rejected the login; check SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__USER and "
        "__PASSWORD"
    ),
    ErrorKind.MISSING_DATABASE: (
        "the layer database does not exist; check SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__DBNAME"
    ),
    ErrorKind.TRANSIENT: (
        "cannot reach Postgres; check SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__HOSTNAME and __PORT"
    ),
    ErrorKind.ACCESS_DENIED: "the Postgres role lacks a privilege the backfill needs",
    ErrorKind.UNTRUSTED_CERTIFICATE: (
        "the Postgres server's TLS certificate is not trusted; set "
        "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__SSL_CA_CERT (or __CERTIFICATE__TYPE and "
        "__SOURCE) to the CA it chains to, and connect by a name it holds (__HOSTNAME)"
    ),
    ErrorKind.TLS_REFUSED: (
        "the Postgres server does not offer TLS, which "
        "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__SSLMODE requires (a __CERTIFICATE without "
        "SSLMODE means verify-full); set SSLMODE to prefer or disable, or enable TLS on the server"
    ),
}


def explain_storage_error(exc: StorageError) -> str:
    """One actionable line for a storage failure outside the copy loop."""
    if isinstance(exc, S3LayerError) and exc.kind in _S3_ADVICE:
        return _S3_ADVICE[exc.kind].format(
            bucket=exc.bucket,
            code=exc.code or exc.status,
            operation=exc.operation,
            permission=_S3_PERMISSIONS.get(exc.operation, f"s3:{exc.operation}"),
            detail=exc.detail,
        )
    if isinstance(exc, PgLayerError) and exc.kind in _PG_ADVICE:
        return f"{_PG_ADVICE[exc.kind]} ({exc})"
    return str(exc)


async def check_table(pg: PgLayer, policy: RetryPolicy) -> None:
    """The cache's table exists and the role may read it."""
    try:
        exists, readable = await call_with_retries(pg.check_readable, policy)
    except StorageError as exc:
        raise PreflightError(explain_storage_error(exc)) from exc
    if not exists:
        raise PreflightError(
            f"table {pg.spec.table} does not exist in the layer database; create the schema with "
            "--migration-mode runAndQuit or check SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__DBNAME"
        )
    if not readable:
        raise PreflightError(
            f"the Postgres role may not read table {pg.spec.table}; "
            f"GRANT SELECT ON {pg.spec.table} TO the backfill's role"
        )


async def check_bucket(s3: S3Layer, policy: RetryPolicy) -> None:
    """The cache's bucket exists and the credentials may list it."""
    try:
        await call_with_retries(s3.check_bucket, policy)
    except StorageError as exc:
        raise PreflightError(explain_storage_error(exc)) from exc


async def check_read_only(pool: asyncpg.Pool, policy: RetryPolicy) -> str | None:
    """Why the layer database takes no writes (a standby, a read-only default), or None; asked
    once per run, before the progress store is chosen."""
    try:
        return await call_with_retries(lambda: server_read_only_reason(pool), policy)
    except StorageError as exc:
        raise PreflightError(explain_storage_error(exc)) from exc


class WriteCheck(StrEnum):
    """What the write probe found."""

    OK = "ok"
    OK_PROBE_DELETED = "ok (probe written and deleted)"
    NOT_CHECKED = "not checked (S3 busy or unreachable; the copy will tell)"
    SKIPPED = "not needed"


async def check_write_permission(s3: S3Layer) -> WriteCheck:
    """The credentials may PutObject into the cache's bucket; a server that verifies
    ``Content-MD5`` stores nothing (see ``S3Layer.probe_write_permission``).

    One attempt: only a definite refusal stops the run here. A throttled or failed probe says
    nothing about permission, so the copy, which retries within its budget, finds out.
    """
    probe_key = f"{s3.key_prefix}/{WRITE_PROBE_NAME}" if s3.key_prefix else WRITE_PROBE_NAME
    try:
        stored_nothing = await s3.probe_write_permission(probe_key)
    except StorageError as exc:
        if exc.kind.retryable:
            return WriteCheck.NOT_CHECKED
        raise PreflightError(explain_storage_error(exc)) from exc
    return WriteCheck.OK if stored_nothing else WriteCheck.OK_PROBE_DELETED


async def run_preflight(
    pairs: list[tuple[PgLayer, S3Layer]], policy: RetryPolicy, *, writes: bool = True
) -> dict[CacheType, WriteCheck]:
    """Check every selected cache's table and bucket, concurrently, retrying throttling and
    transient faults within ``policy``, then (once they all pass, so that no check is cancelled
    half-way) that each bucket may be written, unless the run only reads (a verification);
    the first lasting failure raises. Returns each cache's write check."""
    try:
        async with asyncio.TaskGroup() as checks:
            for pg, s3 in pairs:
                checks.create_task(check_table(pg, policy))
                checks.create_task(check_bucket(s3, policy))
        if not writes:
            return {pg.spec.cache_type: WriteCheck.SKIPPED for pg, _s3 in pairs}
        async with asyncio.TaskGroup() as checks:
            probes = {
                pg.spec.cache_type: checks.create_task(check_write_permission(s3))
                for pg, s3 in pairs
            }
        return {cache_type: probe.result() for cache_type, probe in probes.items()}
    except ExceptionGroup as group:
        raise first_exception(group) from None
