"""services.s3_endpoints: the walk over the rules, and the same endpoints as botocore's own."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import aioboto3
import pytest
from aiobotocore.config import AioConfig
from botocore.endpoint_provider import EndpointProvider
from botocore.exceptions import BotoCoreError
from botocore.loaders import create_loader

from services.s3_endpoints import (
    EndpointMemo,
    memoize_endpoint_resolution,
    referenced_parameters,
)
from tests.unit.conftest import RequestBuilt


def s3_provider() -> EndpointProvider:
    """A fresh provider for botocore's own S3 ruleset, as a client builds it."""
    loader = create_loader()
    return EndpointProvider(
        ruleset_data=loader.load_service_model("s3", "endpoint-rule-set-1"),
        partition_data=loader.load_data("partitions"),
    )


def test_references_are_found_in_refs_templates_and_nested_rules() -> None:
    rules = [
        {
            "conditions": [{"fn": "isSet", "argv": [{"ref": "Bucket"}]}],
            "type": "tree",
            "rules": [
                {
                    "conditions": [],
                    "endpoint": {"url": "https://{Bucket}.s3.{Region#name}.example"},
                    "type": "endpoint",
                },
                {"conditions": [], "error": "no {Endpoint} here", "type": "error"},
            ],
        }
    ]
    assert referenced_parameters(rules) == {"Bucket", "Region", "Endpoint"}


def test_s3_key_prefix_and_copy_source_are_read_by_no_rule() -> None:
    provider = s3_provider()
    referenced = referenced_parameters(provider.ruleset.rules)
    declared = set(provider.ruleset.parameters)
    assert declared - referenced == {"Key", "Prefix", "CopySource"}


GRID_BUCKETS = (
    "layer-cache-cas",
    "dotted.bucket.name",
    "UPPER_case",
    "arn:aws:s3:us-west-2:123456789012:accesspoint/cache",
)


def _client_grid() -> list[dict[str, Any]]:
    """Client settings the way users write them: regions of several partitions, AWS or a
    custom endpoint, path style or virtual hosts, FIPS, dual-stack and accelerate."""
    grid = []
    for region, endpoint, path_style, (fips, dual, accelerate) in itertools.product(
        ("us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1"),
        (None, "http://127.0.0.1:9"),
        (False, True),
        ((False, False, False), (True, False, False), (False, True, False), (False, False, True)),
    ):
        s3_options: dict[str, Any] = {"addressing_style": "path" if path_style else "virtual"}
        if dual:
            s3_options["use_dualstack_endpoint"] = True
        if accelerate:
            s3_options["use_accelerate_endpoint"] = True
        arguments: dict[str, Any] = {
            "region_name": region,
            "aws_access_key_id": "AKIDEXAMPLE",
            "aws_secret_access_key": "not-a-secret",
            "config": AioConfig(s3=s3_options, use_fips_endpoint=fips),
        }
        if endpoint is not None:
            arguments["endpoint_url"] = endpoint
        grid.append(arguments)
    return grid


async def _outcomes(client: Any) -> list[tuple[str, str]]:
    """(URL or error, signing scope) of each call, for every bucket and several keys."""
    outcomes: list[tuple[str, str]] = []

    def capture(request: Any, **_: Any) -> None:
        authorization = request.headers.get("Authorization", b"")
        scope = authorization.decode() if isinstance(authorization, bytes) else authorization
        outcomes.append((request.url, scope.split("Credential=")[-1].split(",")[0]))
        raise RequestBuilt

    client.meta.events.register_first("before-send.s3", capture)
    for bucket, key in itertools.product(GRID_BUCKETS, ("first", "second/key")):
        for call in (
            client.put_object(Bucket=bucket, Key=key, Body=b"x"),
            client.head_object(Bucket=bucket, Key=key),
            client.list_objects_v2(Bucket=bucket, Prefix=key),
        ):
            try:
                await call
            except RequestBuilt:
                continue
            except BotoCoreError as error:  # the same refusal either way
                outcomes.append((type(error).__name__, str(error)))
    client.meta.events.unregister("before-send.s3", capture)
    return outcomes


async def test_memoized_endpoints_are_botocores_own_for_every_combination() -> None:
    """The same URL, signing scope or error as botocore alone, call for call, over 64 client
    settings, 4 buckets, 2 keys and 3 operations."""
    session = aioboto3.Session()
    kinds: set[str] = set()
    for arguments in _client_grid():
        async with (
            session.client("s3", **arguments) as plain,
            session.client("s3", **arguments) as memoized,
        ):
            assert memoize_endpoint_resolution(memoized)
            expected = await _outcomes(plain)
            assert await _outcomes(memoized) == expected, arguments
            kinds.update("url" if url.startswith("http") else "error" for url, _ in expected)
    assert kinds == {"url", "error"}  # the grid reaches both kinds of answer


async def test_each_new_key_no_longer_resolves_the_endpoint(s3_client: Any) -> None:
    """botocore's own resolution runs once per operation and bucket, not once per key."""
    assert memoize_endpoint_resolution(s3_client)
    memo = s3_client._ruleset_resolver.construct_endpoint
    assert isinstance(memo, EndpointMemo)
    resolutions = 0
    construct = memo.construct_endpoint

    async def counting(*args: Any) -> Any:
        nonlocal resolutions
        resolutions += 1
        return await construct(*args)

    memo.construct_endpoint = counting
    s3_client.meta.events.register_first("before-send.s3", stop_at_send)
    for index in range(50):
        for bucket in ("cas", "other"):
            with pytest.raises(RequestBuilt):
                await s3_client.put_object(Bucket=bucket, Key=f"object-{index}", Body=b"x")
    assert resolutions == 2


async def test_a_region_a_handler_sets_for_one_bucket_gets_its_own_endpoint() -> None:
    """The builtins are read after the ``before-endpoint-resolution`` handlers (botocore's
    region redirector among them) adjust them, so a bucket they move is resolved apart."""

    def moved_bucket(builtins: dict[str, Any], params: dict[str, Any], **_: Any) -> None:
        if params.get("Bucket") == "moved":
            builtins["AWS::Region"] = "ap-southeast-2"

    async with aioboto3.Session().client(
        "s3",
        region_name="eu-west-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="not-a-secret",
    ) as client:
        assert memoize_endpoint_resolution(client)
        client.meta.events.register("before-endpoint-resolution.s3", moved_bucket)
        urls: list[str] = []

        def capture(request: Any, **_: Any) -> None:
            urls.append(request.url)
            raise RequestBuilt

        client.meta.events.register_first("before-send.s3", capture)
        for bucket in ("stays", "moved", "stays", "moved"):
            with pytest.raises(RequestBuilt):
                await client.head_object(Bucket=bucket, Key="k")
    assert (
        urls
        == [
            "https://stays.s3.eu-west-1.amazonaws.com/k",
            "https://moved.s3.ap-southeast-2.amazonaws.com/k",
        ]
        * 2
    )


def test_calls_the_key_cannot_describe_go_to_botocore() -> None:
    class Operation:
        name = "PutObject"

        def __init__(self) -> None:
            self.operation_context_parameters: list[Any] = []
            self.context_parameters = [SimpleNamespace(name="Bucket", member_name="Bucket")]

    class Resolver:
        def __init__(self) -> None:
            self._param_definitions = {"Region": SimpleNamespace(builtin="AWS::Region")}

        async def construct_endpoint(self, *_: Any) -> None:
            return None

        async def _get_customized_builtins(self, *_: Any) -> None:
            return None

    memo = EndpointMemo(Resolver(), frozenset({"Bucket", "Region"}))
    operation = Operation()
    assert memo.key(operation, {"Bucket": "cas"}, {"AWS::Region": "eu-west-1"}) == (
        "PutObject",
        ("cas",),
        ("eu-west-1",),
    )
    assert memo.key(operation, {"Bucket": "cas"}, {"AWS::Region": lambda: "lazy"}) is None
    assert memo.key(operation, {"Bucket": ["unhashable"]}, {"AWS::Region": "x"}) is None
    operation.operation_context_parameters = [{"path": "Delete.Objects[*].Key"}]
    assert memo.key(operation, {"Bucket": "cas"}, {"AWS::Region": "eu-west-1"}) is None


def stop_at_send(**_: Any) -> None:
    raise RequestBuilt


async def test_the_pinned_aiobotocore_client_is_memoized_once(s3_client: Any) -> None:
    """If an aiobotocore upgrade moves the resolver, this fails rather than the CPU saving
    silently going away."""
    assert memoize_endpoint_resolution(s3_client)
    memo = s3_client._ruleset_resolver.construct_endpoint
    assert isinstance(memo, EndpointMemo)
    assert memoize_endpoint_resolution(s3_client)  # a second call does not wrap twice
    assert s3_client._ruleset_resolver.construct_endpoint is memo
    assert "Key" not in memo.referenced
    assert "Bucket" in memo.referenced


async def test_the_memoized_client_builds_the_same_request_urls(s3_client: Any) -> None:
    """Through the client's own request building (no request is sent): same URL per call."""
    urls: list[str] = []

    def capture(request: Any, **_: Any) -> None:
        urls.append(request.url)
        raise RequestBuilt

    s3_client.meta.events.register_first("before-send.s3", capture)

    async def build_all() -> list[str]:
        urls.clear()
        for key in ("a", "deep/key with space", "ünïcode"):
            for call in (
                s3_client.put_object(Bucket="cas", Key=key, Body=b"x"),
                s3_client.head_object(Bucket="cas", Key=key),
                s3_client.get_object(Bucket="cas", Key=key),
            ):
                with pytest.raises(RequestBuilt):
                    await call
        with pytest.raises(RequestBuilt):
            await s3_client.list_objects_v2(Bucket="cas", Prefix="p/")
        return list(urls)

    plain = await build_all()
    assert memoize_endpoint_resolution(s3_client)
    assert await build_all() == plain
    assert len(plain) == 10


def test_a_client_without_a_ruleset_is_left_alone() -> None:
    class NoResolver:
        _ruleset_resolver = None

    assert not memoize_endpoint_resolution(NoResolver())
