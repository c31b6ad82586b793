"""``layer_cache.s3``'s pure parts: which PutObject answers carry an MD5 ETag and when a PUT
counts as damaged; ``credential_refresh``, forcing aiobotocore's refreshable credentials to refresh.

For the refresh, a real aiobotocore client (it opens no connection until a request is sent) whose
credential chain is one provider of ours handing out ``AioRefreshableCredentials``, as the IAM
role, web identity and container providers do. These tests pin the aiobotocore internals the
refresh relies on.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from aiobotocore.credentials import AioCredentialResolver, AioRefreshableCredentials
from aiobotocore.session import AioSession
from botocore.credentials import CredentialProvider
from botocore.exceptions import CredentialRetrievalError

from layer_cache.errors import ErrorKind, S3LayerError
from layer_cache.s3 import BodyDigest, credential_refresh, put_etag_is_md5

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


# --------------------------------------------------------------------------------------------
# PutObject ETags and damaged PUTs

BODY = b"a layer cache value"
MD5_ETAG = f'"{hashlib.md5(BODY).hexdigest()}"'
OTHER_ETAG = f'"{hashlib.md5(b"something else").hexdigest()}"'


@pytest.mark.parametrize(
    ("response", "is_md5"),
    [
        ({}, True),  # unencrypted (moto, s3rver, MinIO without KMS)
        ({"ServerSideEncryption": "AES256"}, True),  # SSE-S3 keeps MD5 ETags
        ({"ServerSideEncryption": "aws:kms"}, False),
        ({"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "arn:aws:kms:…"}, False),
        ({"ServerSideEncryption": "aws:kms:dsse"}, False),
        ({"SSECustomerAlgorithm": "AES256", "SSECustomerKeyMD5": "abc="}, False),
        ({"ServerSideEncryption": "AES256", "SSECustomerAlgorithm": "AES256"}, False),
        ({"SSECustomerAlgorithm": ""}, True),  # an empty header names no algorithm
    ],
)
def test_put_etag_is_md5_unless_the_answer_says_kms_or_customer_key(
    response: dict[str, Any], is_md5: bool
) -> None:
    assert put_etag_is_md5(response) is is_md5


@pytest.mark.parametrize(
    ("response", "damaged"),
    [
        ({"ETag": MD5_ETAG}, False),
        ({"ETag": OTHER_ETAG}, True),
        ({"ETag": OTHER_ETAG, "ServerSideEncryption": "AES256"}, True),
        ({"ETag": OTHER_ETAG, "ServerSideEncryption": "aws:kms"}, False),
        ({"ETag": OTHER_ETAG, "ServerSideEncryption": "aws:kms:dsse"}, False),
        ({"ETag": OTHER_ETAG, "SSECustomerAlgorithm": "AES256"}, False),
        ({"ETag": '"0123abcd-2"'}, False),  # multipart: not an MD5
        ({}, False),  # no ETag at all
    ],
)
def test_a_put_is_damaged_only_when_an_md5_etag_contradicts_the_body(
    response: dict[str, Any], damaged: bool
) -> None:
    assert BodyDigest(BODY).contradicted_by_put(response) is damaged


# --------------------------------------------------------------------------------------------
# credential_refresh


def expired_token() -> S3LayerError:
    return S3LayerError(
        "PutObject failed: ExpiredToken",
        kind=ErrorKind.CREDENTIALS_EXPIRED,
        operation="PutObject",
        bucket="bucket",
        key="key",
        code="ExpiredToken",
    )


class Chain(CredentialProvider):
    """A credential provider: every fetch hands out the next access key, valid for an hour
    (so aiobotocore sees no reason to refresh on its own)."""

    METHOD = "test-chain"
    CANONICAL_NAME = "TestChain"

    def __init__(self) -> None:
        super().__init__()
        self.fetches = 0
        self.failure: Exception | None = None

    def metadata(self) -> dict[str, str]:
        if self.failure is not None:
            raise self.failure
        self.fetches += 1
        expiry = datetime.now(UTC) + timedelta(hours=1)
        return {
            "access_key": f"KEY{self.fetches}",
            "secret_key": f"secret{self.fetches}",
            "token": f"token{self.fetches}",
            "expiry_time": expiry.isoformat(),
        }

    async def refresh(self) -> dict[str, str]:
        return self.metadata()

    async def load(self) -> AioRefreshableCredentials:
        return AioRefreshableCredentials.create_from_metadata(
            self.metadata(), refresh_using=self.refresh, method=self.METHOD
        )


@asynccontextmanager
async def client_with(chain: Chain | None) -> AsyncIterator[S3Client]:
    session = AioSession()
    if chain is None:
        session.set_credentials("STATIC", "static-secret")
    else:
        session.register_component("credential_provider", AioCredentialResolver([chain]))
    async with session.create_client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9"
    ) as client:
        yield client


async def access_key(client: S3Client) -> str:
    credentials: Any = client._get_credentials()  # type: ignore[attr-defined]
    frozen = await credentials.get_frozen_credentials()
    return str(frozen.access_key)


async def test_static_credentials_have_nothing_to_refresh() -> None:
    async with client_with(None) as client:
        assert credential_refresh(client, expired_token()) is None


async def test_a_refresh_fetches_new_credentials_before_they_expire_locally() -> None:
    chain = Chain()
    async with client_with(chain) as client:
        assert await access_key(client) == "KEY1"
        refresh = credential_refresh(client, expired_token())
        assert refresh is not None
        await refresh()
        assert await access_key(client) == "KEY2"
        assert chain.fetches == 2


async def test_calls_that_failed_with_the_same_credentials_refresh_once() -> None:
    chain = Chain()
    async with client_with(chain) as client:
        await access_key(client)
        refreshes = [credential_refresh(client, expired_token()) for _ in range(5)]
        for refresh in refreshes:
            assert refresh is not None
            await refresh()
        assert chain.fetches == 2
        assert await access_key(client) == "KEY2"
        # A later expiry of the new credentials refreshes again.
        later = credential_refresh(client, expired_token())
        assert later is not None
        await later()
        assert await access_key(client) == "KEY3"


async def test_a_failed_refresh_is_invalid_credentials_and_keeps_the_old_ones() -> None:
    chain = Chain()
    async with client_with(chain) as client:
        await access_key(client)
        refresh: Callable[[], Awaitable[None]] | None = credential_refresh(client, expired_token())
        assert refresh is not None
        chain.failure = CredentialRetrievalError(provider="test-chain", error_msg="STS down")
        with pytest.raises(S3LayerError) as raised:
            await refresh()
        assert raised.value.kind is ErrorKind.INVALID_CREDENTIALS
        assert (raised.value.operation, raised.value.bucket) == ("PutObject", "bucket")
        assert "CredentialRetrievalError" in str(raised.value)
        chain.failure = None
        assert await access_key(client) == "KEY1"
