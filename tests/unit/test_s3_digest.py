"""Which PutObject answers carry an MD5 ETag, and when a PUT counts as damaged."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from layer_cache.s3 import BodyDigest, put_etag_is_md5

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
