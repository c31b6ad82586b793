"""Pure naming rules shared with the live write path: bucket names and object keys.

These must match upstream byte for byte, or the backfill writes objects the service never reads.
"""

from __future__ import annotations

from layer_cache.cache_types import KeyStrategy

_PREFIX_LEVELS = 3
_PREFIX_LEVEL_WIDTH = 2


def bucket_name(table: str, bucket_prefix: str, bucket_suffix: str | None = None) -> str:
    """``{prefix}-{table with _ → -}[-{suffix}]``, e.g. ``si-layer-cache-workspace-snapshots``."""
    name = f"{bucket_prefix}-{table.replace('_', '-')}"
    return f"{name}-{bucket_suffix}" if bucket_suffix else name


def key_levels(key: str) -> list[str]:
    """The directory levels for a key: up to three two-character slices of its first six."""
    whole_levels = min(len(key) // _PREFIX_LEVEL_WIDTH, _PREFIX_LEVELS)
    return [
        key[level * _PREFIX_LEVEL_WIDTH : (level + 1) * _PREFIX_LEVEL_WIDTH]
        for level in range(whole_levels)
    ]


def object_key(
    key: str,
    *,
    key_strategy: KeyStrategy = KeyStrategy.PASSTHROUGH,
    key_prefix: str | None = None,
) -> str:
    """The S3 object key for a row key: ``[{key_prefix}/]ab/cd/ef/<key>``."""
    transformed = key[::-1] if key_strategy is KeyStrategy.REVERSE_KEY else key
    parts = [*key_levels(transformed), transformed]
    if key_prefix:
        parts.insert(0, key_prefix)
    return "/".join(parts)
