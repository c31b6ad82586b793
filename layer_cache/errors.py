"""Every error the product raises on purpose, in one tree, and the only place library errors
are translated.

    LayerCacheError          the root: every error raised on purpose
      StorageError           a storage call failed; its ``ErrorKind`` says how
        PgLayerError         a Postgres call failed (and its SQLSTATE)
        S3LayerError         an S3 call failed (operation, bucket, key, code, HTTP status)
        WriteQueueError      the write queue's directory or database cannot be used
      SchemaError            the layer-db schema is missing, or its history is not upstream's
      WriteQueueUnavailable  the durable write queue cannot be opened at all
      CacheTierUnavailable   the disk tier's directory cannot be used
      SettingsError          a setting is missing, unknown or invalid; the message names it
      TokenFileError         a token file the server cannot use; names the file, never a token
      ListenError            the server cannot bind its socket
      ApiError               a request the server refuses: HTTP status, code and message
      BackfillError          anything that stops a backfill
        BackfillConfigError  a backfill option is missing or invalid (before any connection)
        PreflightError       the environment is not ready (table, bucket, permission, credential)
        CacheBackfillFailed  one cache's backfill failed: the cache, the key and the cause

A test reads the product's packages (``layer_cache``, ``services``, ``migrations_mode``,
``layer_cache_server``, ``si_layer_cache``) for exception classes defined anywhere else, and holds
this tree to the classes below. Outside the product, ``deploy.render.ValuesError`` stays with the
manifest renderer, which stands alone and imports nothing of the product; the benchmark and the
development tools keep their own.

Library errors are mapped here, once, at the boundary, by code. Storage failures become
``PgLayerError`` or ``S3LayerError`` carrying an ``ErrorKind``, and callers decide (retry, skip,
stop) from the kind alone. The context managers ``map_s3_errors()``, ``map_pg_errors()`` and
``map_pg_connect_errors()`` wrap every storage call, so no botocore, aiohttp or asyncpg exception
escapes ``layer_cache``. They read error codes, SQLSTATEs and HTTP statuses, never message text
(messages are localizable and change between servers; codes do not). An ``OSError`` counts as a
lost connection only around opening one; around a query it is not a database answer and is not
relabelled. A TLS certificate that fails verification is found by type wherever the transport
wrapped it (``untrusted_certificate``) and is ``UNTRUSTED_CERTIFICATE``: trying again cannot
help. An expired session token is ``CREDENTIALS_EXPIRED``: retryable, with a ``before_retry``
(set by the S3 layer) that makes the credential chain fetch new credentials. What an error means
to the user is decided by class at the two edges: the exit status in ``si_layer_cache.cli`` (the
command line), the HTTP answer in ``layer_cache_server.server`` (``ApiError`` as it says, a
``StorageError`` by its kind). ``first_exception`` takes the error that stopped a task group out
of the exception group it raises. Nothing here holds a resource.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from enum import StrEnum

import asyncpg
import botocore.exceptions

from layer_cache.cache_types import CacheType

try:  # aiohttp is aiobotocore's transport; its connection errors surface unwrapped at times.
    import aiohttp

    _TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
        aiohttp.ClientConnectionError,
        aiohttp.ClientPayloadError,
    )
except ImportError:  # pragma: no cover - aiohttp ships with aiobotocore
    _TRANSPORT_ERRORS = ()


class ErrorKind(StrEnum):
    """What went wrong, as far as deciding the next step is concerned."""

    THROTTLED = "throttled"
    TRANSIENT = "transient"
    NOT_FOUND = "not_found"
    ACCESS_DENIED = "access_denied"
    INVALID_CREDENTIALS = "invalid_credentials"
    MISSING_BUCKET = "missing_bucket"
    MISSING_TABLE = "missing_table"
    MISSING_DATABASE = "missing_database"
    CREDENTIALS_EXPIRED = "credentials_expired"
    UNTRUSTED_CERTIFICATE = "untrusted_certificate"  # the server's TLS certificate failed checks
    TLS_REFUSED = "tls_refused"  # the settings require TLS; the server does not offer it
    OTHER = "other"

    @property
    def retryable(self) -> bool:
        """Throttling, transient faults and an expired session token (after the credentials
        are refreshed) are worth another attempt; nothing else is."""
        return self in (ErrorKind.THROTTLED, ErrorKind.TRANSIENT, ErrorKind.CREDENTIALS_EXPIRED)

    @property
    def needs_operator(self) -> bool:
        """Refusals an operator fixes (a permission, the credentials, creating the bucket, table
        or database, trusting a CA, enabling TLS): nothing changes until they act, and then
        every write works again. A durable write queue holds its entries on these."""
        return self in _NEEDS_OPERATOR


_NEEDS_OPERATOR = frozenset(
    {
        ErrorKind.ACCESS_DENIED,
        ErrorKind.INVALID_CREDENTIALS,
        ErrorKind.MISSING_BUCKET,
        ErrorKind.MISSING_TABLE,
        ErrorKind.MISSING_DATABASE,
        ErrorKind.UNTRUSTED_CERTIFICATE,
        ErrorKind.TLS_REFUSED,
    }
)


class LayerCacheError(Exception):
    """Root of every error this project raises on purpose."""


class StorageError(LayerCacheError):
    """A storage call failed; ``kind`` says how.

    ``before_retry``, when set, is awaited by ``call_with_retries`` before the next attempt: what
    may make that attempt succeed (for ``CREDENTIALS_EXPIRED``, refreshing the credentials). It
    may raise a ``StorageError`` of its own, which ends the retries.
    """

    def __init__(self, message: str, *, kind: ErrorKind) -> None:
        super().__init__(message)
        self.kind = kind
        self.before_retry: Callable[[], Awaitable[None]] | None = None


class PgLayerError(StorageError):
    """A Postgres call failed."""

    def __init__(self, message: str, *, kind: ErrorKind, sqlstate: str | None = None) -> None:
        super().__init__(message, kind=kind)
        self.sqlstate = sqlstate


class S3LayerError(StorageError):
    """An S3 call failed for one operation on one bucket (and key, when there is one)."""

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind,
        operation: str,
        bucket: str,
        key: str | None = None,
        code: str | None = None,
        status: int | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message, kind=kind)
        self.operation = operation
        self.bucket = bucket
        self.key = key
        self.code = code
        self.status = status
        self.detail = detail  # what the transport said, when it helps (why a certificate failed)


class WriteQueueError(StorageError):
    """The queue's directory or database cannot be used (unwritable, disk full, corrupt)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind=ErrorKind.TRANSIENT)


class SchemaError(LayerCacheError):
    """The layer-db schema is missing, or its migration history is not upstream's."""


class WriteQueueUnavailable(LayerCacheError):
    """The queue cannot be opened at all (a settings or environment problem)."""


class CacheTierUnavailable(LayerCacheError):
    """The disk tier's directory cannot be used (a settings or environment problem)."""


class SettingsError(LayerCacheError):
    """A setting is missing, unknown or invalid; the message names it."""


class TokenFileError(LayerCacheError):
    """A token file that cannot be used; the message names the file, never a token."""


class ListenError(LayerCacheError):
    """The server could not bind its socket (address in use, not permitted…)."""


class ApiError(LayerCacheError):
    """A request the API refuses, answered as a JSON error."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


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


_S3_CODE_KINDS: dict[str, ErrorKind] = {
    "SlowDown": ErrorKind.THROTTLED,
    "RequestLimitExceeded": ErrorKind.THROTTLED,
    "Throttling": ErrorKind.THROTTLED,
    "ThrottlingException": ErrorKind.THROTTLED,
    "TooManyRequests": ErrorKind.THROTTLED,
    "RequestThrottled": ErrorKind.THROTTLED,
    "ServiceUnavailable": ErrorKind.THROTTLED,
    "InternalError": ErrorKind.TRANSIENT,
    "RequestTimeout": ErrorKind.TRANSIENT,
    "BadDigest": ErrorKind.TRANSIENT,  # the body was damaged on the way: send it again
    "IncompleteBody": ErrorKind.TRANSIENT,
    "NoSuchKey": ErrorKind.NOT_FOUND,
    "NotFound": ErrorKind.NOT_FOUND,
    "NoSuchBucket": ErrorKind.MISSING_BUCKET,
    "AccessDenied": ErrorKind.ACCESS_DENIED,
    "AllAccessDisabled": ErrorKind.ACCESS_DENIED,
    "AccountProblem": ErrorKind.ACCESS_DENIED,
    "InvalidAccessKeyId": ErrorKind.INVALID_CREDENTIALS,
    "SignatureDoesNotMatch": ErrorKind.INVALID_CREDENTIALS,
    # The session token expired: retried once the credential chain has refreshed.
    "ExpiredToken": ErrorKind.CREDENTIALS_EXPIRED,
    "ExpiredTokenException": ErrorKind.CREDENTIALS_EXPIRED,
    "TokenRefreshRequired": ErrorKind.CREDENTIALS_EXPIRED,
    "RequestExpired": ErrorKind.CREDENTIALS_EXPIRED,  # signed too long ago: sign it afresh
    "InvalidToken": ErrorKind.INVALID_CREDENTIALS,
    "InvalidClientTokenId": ErrorKind.INVALID_CREDENTIALS,
}

_S3_STATUS_KINDS: dict[int, ErrorKind] = {
    429: ErrorKind.THROTTLED,
    503: ErrorKind.THROTTLED,
    500: ErrorKind.TRANSIENT,
    502: ErrorKind.TRANSIENT,
    504: ErrorKind.TRANSIENT,
    404: ErrorKind.NOT_FOUND,
    403: ErrorKind.ACCESS_DENIED,
}


def classify_s3_error(code: str | None, status: int | None) -> ErrorKind:
    """Classify an S3 error response by its code, then by its HTTP status.

    HEAD responses have no body, so their code is the status as a string (``"404"``).
    """
    if code and code in _S3_CODE_KINDS:
        return _S3_CODE_KINDS[code]
    if status is None and code and code.isdigit():
        status = int(code)
    if status is not None:
        return _S3_STATUS_KINDS.get(status, ErrorKind.OTHER)
    return ErrorKind.OTHER


_PG_SQLSTATE_KINDS: dict[str, ErrorKind] = {
    "40001": ErrorKind.TRANSIENT,  # serialization_failure
    "40P01": ErrorKind.TRANSIENT,  # deadlock_detected
    "53300": ErrorKind.TRANSIENT,  # too_many_connections
    "57014": ErrorKind.TRANSIENT,  # query_canceled (statement_timeout, pg_cancel_backend)
    "57P01": ErrorKind.TRANSIENT,  # admin_shutdown (pg_terminate_backend, restart)
    "57P02": ErrorKind.TRANSIENT,  # crash_shutdown
    "57P03": ErrorKind.TRANSIENT,  # cannot_connect_now (starting up, failing over)
    "42P01": ErrorKind.MISSING_TABLE,  # undefined_table
    "3D000": ErrorKind.MISSING_DATABASE,  # invalid_catalog_name
    "42501": ErrorKind.ACCESS_DENIED,  # insufficient_privilege
    "25006": ErrorKind.ACCESS_DENIED,  # read_only_sql_transaction
    "28P01": ErrorKind.INVALID_CREDENTIALS,  # invalid_password
    "28000": ErrorKind.INVALID_CREDENTIALS,  # invalid_authorization_specification
}


# invalid_sql_statement_name / duplicate_prepared_statement: a pooler in transaction mode
# (PgBouncer in front of RDS) handed asyncpg's named statements to another server session.
_PGBOUNCER_HINT = (
    "; behind PgBouncer (or another pooler) in transaction mode, set "
    "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__STATEMENT_CACHE_SIZE=0"
)
# What to change when a SQLSTATE has one well-known cause in this job's setting.
_PG_SQLSTATE_HINTS: dict[str, str] = {"26000": _PGBOUNCER_HINT, "42P05": _PGBOUNCER_HINT}


def classify_pg_sqlstate(sqlstate: str | None) -> ErrorKind:
    """Classify a Postgres error by SQLSTATE; class 08 (connection exception) is transient."""
    if sqlstate is None:
        return ErrorKind.OTHER
    if sqlstate in _PG_SQLSTATE_KINDS:
        return _PG_SQLSTATE_KINDS[sqlstate]
    if sqlstate.startswith("08"):
        return ErrorKind.TRANSIENT
    return ErrorKind.OTHER


_S3_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    # botocore's two transport families: HTTPClientError (ReadTimeoutError,
    # ConnectionClosedError, ResponseStreamingError; aiobotocore also wraps any unexpected
    # aiohttp failure in it) and botocore's ConnectionError (EndpointConnectionError,
    # ConnectTimeoutError, SSLError, ProxyConnectionError), which is not the builtin one.
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.IncompleteReadError,  # the body ended before its Content-Length
    botocore.exceptions.FlexibleChecksumError,  # the body's checksum is wrong: damaged on the way
    botocore.exceptions.ChecksumError,
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
    *_TRANSPORT_ERRORS,
)

# A certificate the client refused; aiohttp wraps it, but one raised bare is classified alike.
_S3_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    *_S3_TRANSPORT_ERRORS,
    ssl.SSLCertVerificationError,
)

_S3_CREDENTIAL_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.TokenRetrievalError,
)


def untrusted_certificate(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind ``exc``, if one is: found by type through
    the causes, the contexts and botocore's wrapped ``error`` (botocore's ``SSLError`` around
    aiohttp's ``ClientConnectorCertificateError``, itself one, around OpenSSL's own); the one
    that carries OpenSSL's reason (``verify_message``) when there is one."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    found: list[ssl.SSLCertVerificationError] = []
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            found.append(current)
        wrapped = getattr(current, "kwargs", None)
        inner = wrapped.get("error") if isinstance(wrapped, dict) else None
        for linked in (inner, current.__cause__, current.__context__):
            if isinstance(linked, BaseException):
                pending.append(linked)
    with_reason = [error for error in found if getattr(error, "verify_message", None)]
    candidates = with_reason or found
    return candidates[0] if candidates else None


def verify_reason(error: ssl.SSLCertVerificationError) -> str:
    """Why OpenSSL refused the certificate (``unable to get local issuer certificate``, a host
    name mismatch, …): OpenSSL's fixed English text, shown to the operator, never matched."""
    reason = getattr(error, "verify_message", None)
    return reason if isinstance(reason, str) and reason else "certificate verify failed"


def _describe(exc: BaseException) -> str:
    """The exception's type, and the type botocore wrapped in it (``SSLError(ClientSSLError)``)."""
    inner = getattr(exc, "kwargs", {}).get("error")
    return (
        f"{type(exc).__name__}({type(inner).__name__})" if inner is not None else type(exc).__name__
    )


def _s3_failure(
    operation: str,
    bucket: str,
    key: str | None,
    reason: str,
    kind: ErrorKind,
    *,
    code: str | None = None,
    status: int | None = None,
    detail: str | None = None,
) -> S3LayerError:
    """The ``S3LayerError`` for one failed call, its message naming the call and the object."""
    where = f"{operation} s3://{bucket}/{key}" if key else f"{operation} s3://{bucket}"
    return S3LayerError(
        f"{where} failed: {reason}",
        kind=kind,
        operation=operation,
        bucket=bucket,
        key=key,
        code=code,
        status=status,
        detail=detail,
    )


@contextmanager
def map_credential_refresh_errors(
    operation: str, bucket: str, key: str | None = None
) -> Iterator[None]:
    """Translate a failed forced refresh of the S3 credentials into ``S3LayerError`` (invalid
    credentials: not retryable). A provider fails with a botocore error, an STS ``ClientError``,
    or aiobotocore's ``RuntimeError`` when the refreshed credentials are still expired."""
    try:
        yield
    except (
        botocore.exceptions.BotoCoreError,
        botocore.exceptions.ClientError,
        RuntimeError,
    ) as exc:
        reason = (
            "the session token has expired and refreshing the credentials"
            f" failed ({_describe(exc)})"
        )
        raise _s3_failure(operation, bucket, key, reason, ErrorKind.INVALID_CREDENTIALS) from exc


_CREDENTIALS_EXPIRED_NOTE = (
    ": the session token has expired; credentials from the AWS chain (iam_role) are refreshed"
    " before each retry, static credentials cannot be"
)


@contextmanager
def map_s3_errors(operation: str, bucket: str, key: str | None = None) -> Iterator[None]:
    """Translate botocore/aiohttp failures raised inside the block into ``S3LayerError``."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        kind = classify_s3_error(code, status)
        explanation = _CREDENTIALS_EXPIRED_NOTE if kind is ErrorKind.CREDENTIALS_EXPIRED else ""
        reason = f"{code or status} ({kind}){explanation}"
        raise _s3_failure(operation, bucket, key, reason, kind, code=code, status=status) from exc
    except _S3_CREDENTIAL_ERRORS as exc:
        reason = f"no usable S3 credentials ({type(exc).__name__})"
        raise _s3_failure(operation, bucket, key, reason, ErrorKind.INVALID_CREDENTIALS) from exc
    except _S3_CONNECTION_ERRORS as exc:
        certificate = untrusted_certificate(exc)
        if certificate is not None:
            why = verify_reason(certificate)
            reason = f"the S3 endpoint's TLS certificate is not trusted ({why})"
            raise _s3_failure(
                operation, bucket, key, reason, ErrorKind.UNTRUSTED_CERTIFICATE, detail=why
            ) from exc
        reason = f"{_describe(exc)} talking to the S3 endpoint"
        raise _s3_failure(operation, bucket, key, reason, ErrorKind.TRANSIENT) from exc
    except botocore.exceptions.BotoCoreError as exc:  # the rest: not worth another attempt
        raise _s3_failure(operation, bucket, key, _describe(exc), ErrorKind.OTHER) from exc


# asyncpg's InterfaceErrors that are about our configuration or code, not a lost connection.
_PG_CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
    asyncpg.exceptions.UnsupportedServerFeatureError,
)

_PG_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,  # "connection is closed" and friends: the socket went away
    # A connection killed mid-protocol can leave asyncpg's state machine confused ("cannot
    # switch to state …"); the pool discards that connection, so a retry runs on a fresh one.
    asyncpg.InternalClientError,
    ConnectionError,  # reset, refused, broken pipe
    TimeoutError,
    asyncio.TimeoutError,
)

# Opening a connection can also fail with a plain socket error: no route to the host, a name
# that does not resolve (socket.gaierror), a TLS handshake that fails (ssl.SSLError).
_PG_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*_PG_CONNECTION_ERRORS, OSError)


@contextmanager
def map_pg_errors(what: str) -> Iterator[None]:
    """Translate asyncpg failures raised inside the block (a query) into ``PgLayerError``."""
    with _mapping_pg_errors(what, _PG_CONNECTION_ERRORS):
        yield


@contextmanager
def map_pg_connect_errors(what: str) -> Iterator[None]:
    """``map_pg_errors`` for opening a connection: socket errors (``OSError``) too."""
    with _mapping_pg_errors(what, _PG_CONNECT_ERRORS):
        yield


@contextmanager
def _mapping_pg_errors(
    what: str, connection_errors: tuple[type[BaseException], ...]
) -> Iterator[None]:
    try:
        yield
    except asyncpg.PostgresError as exc:
        sqlstate = getattr(exc, "sqlstate", None)
        kind = classify_pg_sqlstate(sqlstate)
        # asyncpg fills ``message`` from the server's answer; errors it raises itself (a
        # connection closed mid-operation) carry their text as the argument instead.
        text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        hint = _PG_SQLSTATE_HINTS.get(sqlstate or "", "")
        raise PgLayerError(
            f"{what} failed: {text} (SQLSTATE {sqlstate}, {kind}){hint}",
            kind=kind,
            sqlstate=sqlstate,
        ) from exc
    except _PG_CLIENT_ERRORS as exc:
        raise PgLayerError(f"{what} failed: {type(exc).__name__}", kind=ErrorKind.OTHER) from exc
    except connection_errors as exc:
        certificate = untrusted_certificate(exc)
        if certificate is not None:
            raise PgLayerError(
                f"{what} failed: the server's TLS certificate is not trusted "
                f"({verify_reason(certificate)})",
                kind=ErrorKind.UNTRUSTED_CERTIFICATE,
            ) from exc
        raise PgLayerError(
            f"{what} failed: {type(exc).__name__}: lost or could not open the connection",
            kind=ErrorKind.TRANSIENT,
        ) from exc
