"""services.s3_endpoints: the walk over the rules, and the same endpoints as botocore's own."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import pytest
from botocore.endpoint_provider import EndpointProvider
from botocore.exceptions import EndpointResolutionError
from botocore.loaders import create_loader

from services.s3_endpoints import (
    ReferencedParametersProvider,
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


def _parameter_grid() -> list[dict[str, Any]]:
    """Parameters as botocore builds them for S3 calls: regions of several partitions, FIPS,
    dual-stack, accelerate, custom endpoints, path style, and buckets that are DNS-safe, dotted,
    upper case or access-point ARNs."""
    buckets = [
        "layer-cache-cas",
        "dotted.bucket.name",
        "UPPER_case",
        "arn:aws:s3:us-west-2:123456789012:accesspoint/cache",
    ]
    regions = ["us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1", "aws-global"]
    endpoints = [None, "http://127.0.0.1:9000", "https://s3.example.internal"]
    grid = []
    for bucket, region, endpoint, fips, dual, path_style, accelerate in itertools.product(
        buckets, regions, endpoints, (False, True), (False, True), (False, True), (False, True)
    ):
        parameters: dict[str, Any] = {
            "Bucket": bucket,
            "Region": region,
            "UseFIPS": fips,
            "UseDualStack": dual,
            "ForcePathStyle": path_style,
            "Accelerate": accelerate,
            "UseGlobalEndpoint": False,
            "UseArnRegion": True,
            "DisableMultiRegionAccessPoints": False,
            "Key": f"{bucket}/{region}/object",
        }
        if endpoint is not None:
            parameters["Endpoint"] = endpoint
        grid.append(parameters)
    return grid


def _resolve(provider: Any, parameters: dict[str, Any]) -> tuple[str, Any]:
    try:
        endpoint = provider.resolve_endpoint(**parameters)
    except EndpointResolutionError as error:
        return ("error", str(error).split("\n")[0])
    return ("endpoint", (endpoint.url, endpoint.properties, endpoint.headers))


def test_endpoints_are_botocores_own_for_every_combination() -> None:
    plain = s3_provider()
    wrapped = ReferencedParametersProvider(
        s3_provider(), referenced_parameters(plain.ruleset.rules)
    )
    outcomes = set()
    grid = _parameter_grid()
    for parameters in grid:
        expected = _resolve(plain, parameters)
        assert _resolve(wrapped, parameters) == expected, parameters
        outcomes.add(expected[0])
    assert len(grid) == 960
    assert outcomes == {"endpoint", "error"}  # the grid reaches both kinds of answer


def test_each_new_key_no_longer_evaluates_the_ruleset() -> None:
    provider = s3_provider()
    wrapped = ReferencedParametersProvider(provider, referenced_parameters(provider.ruleset.rules))
    evaluations = 0
    evaluate = provider.ruleset.evaluate

    def counting(parameters: Mapping[str, Any]) -> Any:
        nonlocal evaluations
        evaluations += 1
        return evaluate(parameters)

    provider.ruleset.evaluate = counting  # type: ignore[method-assign, assignment]
    base = {"Bucket": "cas", "Region": "us-east-1", "UseFIPS": False, "UseDualStack": False}
    for index in range(200):
        wrapped.resolve_endpoint(**base, Key=f"object-{index}")
    assert evaluations == 1
    for index in range(3):
        provider.resolve_endpoint(**base, Key=f"plain-{index}")
    assert evaluations == 4  # botocore alone: once per key


async def test_the_pinned_aiobotocore_client_is_memoized_once(s3_client: Any) -> None:
    """If an aiobotocore upgrade moves the resolver, this fails rather than the CPU saving
    silently going away."""
    assert memoize_endpoint_resolution(s3_client)
    provider = s3_client._ruleset_resolver._provider
    assert isinstance(provider, ReferencedParametersProvider)
    assert memoize_endpoint_resolution(s3_client)  # a second call does not wrap twice
    assert s3_client._ruleset_resolver._provider is provider
    assert "Key" not in provider.referenced
    assert "Bucket" in provider.referenced


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
