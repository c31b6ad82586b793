from __future__ import annotations

import pytest

from layer_cache.errors import ErrorKind, classify_pg_sqlstate, classify_s3_error


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("SlowDown", 503, ErrorKind.THROTTLED),
        ("RequestLimitExceeded", 400, ErrorKind.THROTTLED),
        ("503", None, ErrorKind.THROTTLED),  # HEAD: no body, the code is the status
        (None, 429, ErrorKind.THROTTLED),
        ("InternalError", 500, ErrorKind.TRANSIENT),
        (None, 502, ErrorKind.TRANSIENT),
        ("504", None, ErrorKind.TRANSIENT),
        ("BadDigest", 400, ErrorKind.TRANSIENT),
        ("404", None, ErrorKind.NOT_FOUND),
        ("NoSuchKey", 404, ErrorKind.NOT_FOUND),
        ("NoSuchBucket", 404, ErrorKind.MISSING_BUCKET),
        ("AccessDenied", 403, ErrorKind.ACCESS_DENIED),
        ("403", None, ErrorKind.ACCESS_DENIED),
        ("InvalidAccessKeyId", 403, ErrorKind.INVALID_CREDENTIALS),
        ("SignatureDoesNotMatch", 403, ErrorKind.INVALID_CREDENTIALS),
        ("InvalidArgument", 400, ErrorKind.OTHER),
        (None, None, ErrorKind.OTHER),
    ],
)
def test_s3_errors_are_classified_by_code_then_status(
    code: str | None, status: int | None, kind: ErrorKind
) -> None:
    assert classify_s3_error(code, status) is kind


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("57P01", ErrorKind.TRANSIENT),  # pg_terminate_backend
        ("08006", ErrorKind.TRANSIENT),
        ("08003", ErrorKind.TRANSIENT),
        ("40001", ErrorKind.TRANSIENT),
        ("42P01", ErrorKind.MISSING_TABLE),
        ("42501", ErrorKind.ACCESS_DENIED),
        ("28P01", ErrorKind.INVALID_CREDENTIALS),
        ("3D000", ErrorKind.MISSING_DATABASE),
        ("22001", ErrorKind.OTHER),
        (None, ErrorKind.OTHER),
    ],
)
def test_postgres_errors_are_classified_by_sqlstate(sqlstate: str | None, kind: ErrorKind) -> None:
    assert classify_pg_sqlstate(sqlstate) is kind


def test_only_throttling_and_transient_errors_are_retryable() -> None:
    assert {kind for kind in ErrorKind if kind.retryable} == {
        ErrorKind.THROTTLED,
        ErrorKind.TRANSIENT,
    }
