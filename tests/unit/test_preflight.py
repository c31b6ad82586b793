from __future__ import annotations

import pytest

from layer_cache.errors import ErrorKind, S3LayerError
from migrations_mode.preflight import explain_storage_error


@pytest.mark.parametrize(
    ("operation", "permission"),
    [
        ("ListObjectsV2", "s3:ListBucket"),
        ("HeadObject", "s3:GetObject"),
        ("GetObject", "s3:GetObject"),
        ("PutObject", "s3:PutObject"),
        ("DeleteObject", "s3:DeleteObject"),
    ],
)
def test_access_denied_names_the_refused_operation_and_the_missing_permission(
    operation: str, permission: str
) -> None:
    denied = S3LayerError(
        f"{operation} failed: AccessDenied",
        kind=ErrorKind.ACCESS_DENIED,
        operation=operation,
        bucket="si-layer-cache-cas",
        code="AccessDenied",
        status=403,
    )

    message = explain_storage_error(denied)

    assert message.startswith(
        f"access denied on bucket si-layer-cache-cas: {operation} was refused, "
        f"the credentials lack {permission};"
    ), message
    assert "s3:ListBucket, s3:GetObject and s3:PutObject" in message
