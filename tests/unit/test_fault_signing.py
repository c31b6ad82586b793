from __future__ import annotations

from devenv.faults import signing_access_key

HEADER = (
    "AWS4-HMAC-SHA256 Credential=ASIAEXAMPLE/20261201/us-east-1/s3/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=abc123"
)


def test_the_access_key_comes_from_the_sigv4_authorization_header() -> None:
    assert signing_access_key({"Authorization": HEADER}, {}) == "ASIAEXAMPLE"


def test_the_access_key_comes_from_a_presigned_url() -> None:
    query = {"X-Amz-Credential": "AKIDPRESIGNED/20261201/us-east-1/s3/aws4_request"}
    assert signing_access_key({}, query) == "AKIDPRESIGNED"


def test_unsigned_or_other_schemes_have_no_access_key() -> None:
    assert signing_access_key({}, {}) is None
    assert signing_access_key({"Authorization": "AWS AKIDV2:signature"}, {}) is None
    assert signing_access_key({"Authorization": "AWS4-HMAC-SHA256 SignedHeaders=host"}, {}) is None
