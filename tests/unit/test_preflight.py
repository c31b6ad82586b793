from __future__ import annotations

import pytest

from layer_cache.errors import ErrorKind, PgLayerError, S3LayerError
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


def test_an_untrusted_s3_certificate_says_why_and_names_the_ca_bundle() -> None:
    refused = S3LayerError(
        "HeadBucket s3://si-layer-cache-cas failed: the S3 endpoint's TLS certificate is not "
        "trusted (self-signed certificate in certificate chain)",
        kind=ErrorKind.UNTRUSTED_CERTIFICATE,
        operation="HeadBucket",
        bucket="si-layer-cache-cas",
        detail="self-signed certificate in certificate chain",
    )

    message = explain_storage_error(refused)

    assert message == (
        "the S3 endpoint's TLS certificate is not trusted (self-signed certificate in "
        "certificate chain); set SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__CA_BUNDLE to "
        "the PEM file of the CA it chains to (or AWS_CA_BUNDLE), or check __ENDPOINT"
    )


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        (ErrorKind.TLS_REFUSED, ["does not offer TLS", "PG_POOL_CONFIG__SSLMODE", "prefer"]),
        (ErrorKind.UNTRUSTED_CERTIFICATE, ["not trusted", "PG_POOL_CONFIG__SSL_CA_CERT"]),
    ],
)
def test_postgres_tls_failures_name_the_setting_to_change(
    kind: ErrorKind, names: list[str]
) -> None:
    failure = PgLayerError("connecting to Postgres at db:5432 failed: …", kind=kind)

    message = explain_storage_error(failure)

    assert all(name in message for name in names), message
    assert "HOSTNAME and __PORT" not in message
    assert message.endswith("(connecting to Postgres at db:5432 failed: …)")
