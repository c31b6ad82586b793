from __future__ import annotations

from devenv.faults import path_style_object
from layer_cache.errors import ErrorKind, classify_s3_error


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
