"""The fault proxy's pure parts: the rate throttle (a token bucket driven by explicit times),
object paths, and the access key a request was signed with."""

from __future__ import annotations

import pytest

from devenv.faults import (
    FaultPlan,
    RateGate,
    path_style_bucket,
    path_style_object,
    signing_access_key,
)
from layer_cache.errors import ErrorKind, classify_s3_error


def test_the_gate_admits_its_burst_then_its_rate() -> None:
    gate = RateGate(rate_per_s=100, burst=10, now=0.0)
    assert [gate.admit(0.0) for _ in range(12)] == [True] * 10 + [False] * 2
    assert gate.admit(0.005) is False  # half a token back
    assert gate.admit(0.010) is True  # one token back
    admitted = sum(gate.admit(0.010 + step / 1000) for step in range(1, 1001))
    assert admitted == 100  # one second at 1,000 requests/s: the rate gets through


def test_the_bucket_never_holds_more_than_its_burst() -> None:
    gate = RateGate(rate_per_s=100, burst=10, now=0.0)
    assert sum(gate.admit(60.0) for _ in range(50)) == 10


def test_a_plan_gate_holds_a_tenth_of_a_second_at_least_one() -> None:
    fast = RateGate.for_plan(FaultPlan(max_rate_per_s=500))
    slow = RateGate.for_plan(FaultPlan(max_rate_per_s=2))
    assert fast is not None
    assert slow is not None
    assert (fast.burst, slow.burst) == (50, 1)
    assert RateGate.for_plan(FaultPlan()) is None


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf")])
def test_a_rate_must_be_positive_and_finite(rate: float) -> None:
    with pytest.raises(ValueError, match="max_rate_per_s"):
        FaultPlan(max_rate_per_s=rate)


# --------------------------------------------------------------------------------------------
# Object paths


def test_bucket_and_key_come_from_a_path_style_path() -> None:
    assert path_style_object("/layers/abc") == ("layers", "abc")
    assert path_style_object("/layers/dir/sub/abc") == ("layers", "dir/sub/abc")


def test_the_key_is_percent_decoded_and_the_query_dropped() -> None:
    assert path_style_object("/layers/a%2Fb/c%20d?partNumber=1&uploadId=x") == (
        "layers",
        "a/b/c d",
    )
    assert path_style_object("/layers/a+b") == ("layers", "a+b")  # '+' is literal in a path


def test_service_and_bucket_paths_name_no_object() -> None:
    assert path_style_object("/") is None
    assert path_style_object("") is None
    assert path_style_object("/layers") is None
    assert path_style_object("/layers/") is None
    assert path_style_object("/layers?list-type=2") is None


def test_the_refusal_code_is_not_retried() -> None:
    kind = classify_s3_error("InvalidRequest", 400)
    assert kind is ErrorKind.OTHER
    assert not kind.retryable


# --------------------------------------------------------------------------------------------
# The signing access key

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


def test_the_bucket_of_a_path_is_its_first_segment_and_the_root_has_none() -> None:
    assert path_style_bucket("/layers") == "layers"
    assert path_style_bucket("/layers/") == "layers"
    assert path_style_bucket("/layers/a/b?list-type=2") == "layers"
    assert path_style_bucket("/my%2Dbucket?location") == "my-bucket"
    assert path_style_bucket("/") is None
    assert path_style_bucket("") is None
