"""Setting names: upstream sdf's registry, the tree of names, and each name's verdict.

Operators run this program with upstream sdf's whole environment (its ConfigMap) and config file,
so a name can mean three things here. ``setting_tree`` builds one tree of every known name: the
fields of the settings model (read here, *used*) and the names in ``UPSTREAM_SDF_SETTINGS`` that
upstream sdf defines and this program does not read (*ignored*; an ignored *section* covers every
name below it, as upstream's sections grow). ``classify_setting`` walks a name's path (a TOML key
path, or an env var name split by ``env_setting_path``) down that tree: a name it does not find
is *unknown*, with the closest known name as a suggestion (names read here first: the likelier
intent of a typo), and *tolerated* when it sits in one of ``UPSTREAM_SECTIONS`` (upstream's
loader ignores names it lacks there) and is no misspelling of a name read here.
``unknown_env_var`` is the flat check for a prefix without nesting (``SI_BACKFILL_…``).

Everything here is pure: nothing reads the environment, logs or raises; ``services.settings``
applies the verdicts when it loads the settings (errors, warnings, the debug line of ignored
names). ``docs/upstream-settings.md`` lists the registry; a test keeps the two equal.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel

ENV_PREFIX = "SI_SDF__"
"""Upstream sdf's env prefix: SI_SDF__ + the tree path with "__" between levels."""
UPSTREAM_BACKFILL_PREFIX = "backfill_"
"""Upstream sdf's backfill settings are top-level names with this prefix."""


class SettingUse(StrEnum):
    """What a setting name means to this program."""

    USED = "used"  # read here
    IGNORED = "ignored"  # upstream sdf defines it; it means nothing here
    UNKNOWN = "unknown"  # neither: a typo, an error


@dataclass(frozen=True, slots=True)
class UpstreamSetting:
    """One name in upstream sdf's config tree (``lib/sdf-server/src/config.rs`` ConfigFile)."""

    path: str  # dotted, as in the TOML file; the env var is SI_SDF__ + path with "." → "__"
    use: SettingUse
    note: str
    section: bool = False  # an ignored section: every name below it is upstream's too


def _used(path: str, note: str) -> UpstreamSetting:
    return UpstreamSetting(path, SettingUse.USED, note)


def _ignored(path: str, note: str, *, section: bool = False) -> UpstreamSetting:
    return UpstreamSetting(path, SettingUse.IGNORED, note, section)


_PG = "layer_db_config.pg_pool_config."
_STORAGE = "layer_db_config.object_storage_config."
_AUTH = _STORAGE + "auth"
_CACHE = "layer_db_config.cache_config."

UPSTREAM_SDF_SETTINGS: tuple[UpstreamSetting, ...] = (
    _used("migration_mode", "what to do"),
    _used("layer_db_config.persister_mode", "PersisterMode"),
    *(_used(_PG + name, "the layer-db connection") for name in ("hostname", "port", "user")),
    *(_used(_PG + name, "the layer-db connection") for name in ("password", "dbname")),
    _used(_PG + "application_name", "the layer-db connection"),
    _used(_PG + "pool_max_size", "asyncpg pool max_size"),
    _used(_PG + "certificate.type", "path, base64, as_string or remote: the server's CA"),
    _used(_PG + "certificate.source", "the CA or its URL; no SSLMODE given: verify-full"),
    _used(_PG + "pool_timeout_create_secs", "connect timeout (CONNECT_TIMEOUT_SECS wins)"),
    _used(_PG + "pool_idle_connection_lifetime_secs", "asyncpg max_inactive_connection_lifetime"),
    _used(_PG + "pool_total_connection_lifetime_secs", "connections retired at this age (20 h)"),
    _ignored(_PG + "pool_timeout_wait_secs", "a query waits for a free pooled connection"),
    _ignored(_PG + "pool_timeout_recycle_secs", "asyncpg resets a connection on release"),
    _ignored(_PG + "pool_lifetime_check_interval_secs", "asyncpg checks idle connections itself"),
    _ignored(_PG + "recycling_method", "asyncpg resets a connection on release"),
    _ignored(_PG + "certificate_path", "sdf's --pg-cert-path writes it; not a field, dropped"),
    _ignored(_PG + "certificate_base64", "sdf's --pg-cert-base64 writes it; not a field, dropped"),
    *(
        _used(_STORAGE + name, "the S3 target")
        for name in ("endpoint", "bucket_prefix", "bucket_suffix", "region", "key_prefix")
    ),
    _used(_AUTH, "iam_role: the standard AWS credential chain"),
    _used(_AUTH + ".static_credentials.access_key", "S3 access key"),
    _used(_AUTH + ".static_credentials.secret_key", "S3 secret key"),
    _ignored(_STORAGE + "read_retry", "the backfill retries by its own policy", section=True),
    _ignored(_STORAGE + "num_workers", "sdf's write queue; the backfill has its own concurrency"),
    _ignored(_STORAGE + "max_parallel_per_worker", "sdf's write queue"),
    _ignored("layer_db_config.nats_config", "NATS: not used here", section=True),
    *(
        _used(_CACHE + name, "the server's cache tier size")
        for name in (
            "memory_reserved_percent",
            "memory_usable_max_percent",
            "disk_reserved_percent",
            "disk_usable_max_percent",
        )
    ),
    _used(_CACHE + "disk_layer", "the disk tier on or off"),
    _used(_CACHE + "disk_path", "the disk tier's directory"),
    _used(_CACHE + "disk_admission_rate_limit", "bytes a second written to the disk tier"),
    _used(_CACHE + "disk_buffer_size", "values waiting to be written to the disk tier"),
    _ignored(_CACHE + "name", "set per cache by sdf; only in its logs"),
    *(
        _ignored(_CACHE + name, "foyer's disk engine internals")
        for name in (
            "disk_buffer_flushers",
            "disk_indexer_shards",
            "disk_reclaimers",
            "disk_recover_concurrency",
        )
    ),
    _ignored("layer_db_config.disk_path", "set by sdf's --layer-db-disk-path; not a field"),
    *(
        _used(UPSTREAM_BACKFILL_PREFIX + name, f"--backfill-{name.replace('_', '-')} (below it)")
        for name in (
            "cutoff_timestamp",
            "cache_types",
            "key_batch_size",
            "checkpoint_interval_secs",
            "max_concurrent_uploads",
        )
    ),
    _ignored("backfill_func_runs_cutoff_id", "func runs are not backfilled here"),
    _ignored("backfill_func_run_logs_cutoff_id", "func runs are not backfilled here"),
    _ignored("instance_id", "sdf's instance id"),
    _ignored("dev_mode", "sdf development mode"),
    _ignored("pkgs_path", "sdf packages"),
    _ignored("module_index_url", "sdf module index"),
    _ignored("auth_api_url", "sdf auth API"),
    _ignored("boot_feature_flags", "sdf feature flags"),
    _ignored("create_workspace_permissions", "sdf workspaces"),
    _ignored("create_workspace_allowlist", "sdf workspaces"),
    *(
        _ignored(name, note, section=True)
        for name, note in (
            ("pg", "sdf's main database (the layer db is layer_db_config.pg_pool_config)"),
            ("nats", "NATS: not used here"),
            ("crypto", "veritech encryption keys"),
            ("symmetric_crypto_service", "sdf's symmetric crypto keys"),
            ("jwt_signing_public_key", "sdf's JWT verification"),
            ("jwt_secondary_signing_public_key", "sdf's JWT verification"),
            ("posthog", "sdf's analytics"),
            ("spicedb", "sdf's authorization"),
            ("audit", "the audit database"),
            ("service_endpoints", "sdf's health/config endpoints (ours: SERVER__…)"),
            ("openai", "written by sdf's --openai-* flags"),
            ("asset_sprayer", "written by sdf's --asset-sprayer-prompts-dir"),
        )
    ),
)


@dataclass(slots=True)
class SettingNode:
    """One name of the tree: its verdict and the names below it."""

    use: SettingUse
    children: dict[str, SettingNode] = field(default_factory=dict)
    any_below: bool = False
    upstream_section: bool = False  # upstream sdf's loader ignores names it lacks here


# The sections of our tree that are upstream sdf's too (its config file's tables): upstream's
# loader ignores a name it does not define there, so an unknown name below one is a warning, not
# an error, unless it is a misspelling of a name read here. ``server`` is ours alone.
UPSTREAM_SECTIONS: frozenset[str] = frozenset(
    {
        "",
        "layer_db_config",
        "layer_db_config.pg_pool_config",
        "layer_db_config.pg_pool_config.certificate",
        "layer_db_config.object_storage_config",
        "layer_db_config.object_storage_config.auth",
        "layer_db_config.object_storage_config.auth.static_credentials",
        "layer_db_config.cache_config",
    }
)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation admits (through Optional, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, Annotated):
        return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]
    return []


def _add_model_fields(node: SettingNode, model: type[BaseModel]) -> None:
    for name, info in model.model_fields.items():
        child = node.children.setdefault(name, SettingNode(SettingUse.USED))
        for inner in _models_in(info.annotation):
            _add_model_fields(child, inner)


def setting_tree(
    model: type[BaseModel], upstream: Iterable[UpstreamSetting] = UPSTREAM_SDF_SETTINGS
) -> SettingNode:
    """Every name this program reads (the model's fields) plus upstream's ignored ones."""
    root = SettingNode(SettingUse.USED)
    _add_model_fields(root, model)
    for setting in upstream:
        if setting.use is not SettingUse.IGNORED:
            continue
        node = root
        for part in setting.path.split("."):
            node = node.children.setdefault(part, SettingNode(SettingUse.IGNORED))
        node.any_below = setting.section
    for section in UPSTREAM_SECTIONS:
        node = root
        for part in filter(None, section.split(".")):
            node = node.children[part]
        node.upstream_section = True
    return root


@dataclass(frozen=True, slots=True)
class Classified:
    """A setting name's verdict; for an unknown name, the closest known one if any, and whether
    it is *tolerated*: below a section upstream's loader owns (which ignores names it lacks) and
    no misspelling of a name read here."""

    use: SettingUse
    suggestion: tuple[str, ...] | None = None
    tolerated: bool = False


def classify_setting(tree: SettingNode, path: Sequence[str]) -> Classified:
    """Used, ignored (upstream's) or unknown, with a suggestion for the first wrong part."""
    node = tree
    for depth, part in enumerate(path):
        if node.any_below:
            return Classified(SettingUse.IGNORED)
        child = node.children.get(part)
        if child is None:
            suggestion = _suggest(tree, path, depth, node)
            misspelled = (
                suggestion is not None and classify_setting(tree, suggestion).use is SettingUse.USED
            )
            return Classified(
                SettingUse.UNKNOWN, suggestion, node.upstream_section and not misspelled
            )
        node = child
    return Classified(SettingUse.IGNORED if node.any_below else node.use)


def _suggest(
    tree: SettingNode, path: Sequence[str], depth: int, node: SettingNode
) -> tuple[str, ...] | None:
    """The closest known name, read here ones first (the likelier intent of a typo)."""
    known: list[tuple[SettingUse, tuple[str, ...]]] = []
    for match in difflib.get_close_matches(path[depth], list(node.children), n=3, cutoff=0.6):
        candidate = (*path[:depth], match, *path[depth + 1 :])
        use = classify_setting(tree, candidate).use
        if use is not SettingUse.UNKNOWN:
            known.append((use, candidate))
    used = [candidate for use, candidate in known if use is SettingUse.USED]
    ranked = used or [candidate for _use, candidate in known]
    return ranked[0] if ranked else None


def env_setting_path(name: str, prefix: str = ENV_PREFIX) -> tuple[str, ...]:
    """The tree path of an env var under ``prefix``: SI_SDF__A__B_C → ("a", "b_c")."""
    return tuple(name[len(prefix) :].lower().split("__"))


def env_setting_name(path: Sequence[str], prefix: str = ENV_PREFIX) -> str:
    """The env var for a tree path."""
    return prefix + "__".join(path).upper()


def unknown_setting_message(name: str, suggestion: str | None) -> str:
    """The one line for an unknown setting name."""
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    return f"unknown setting {name}{hint}"


def unknown_env_var(
    environ: Mapping[str, str],
    prefix: str,
    fields: Iterable[str],
    *,
    nested: bool = True,
    ignored: Iterable[str] = (),
) -> str | None:
    """The first env var under ``prefix`` that names no field nor an ``ignored`` name, as an
    "unknown setting" line with a suggestion: pydantic-settings ignores unknown top-level
    variables, and a typo there must not run a job on a default."""
    known = set(fields)
    allowed = known | set(ignored)
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(prefix):
            rest = upper[len(prefix) :]
            field = (rest.split("__", 1)[0] if nested else rest).lower()
            if field not in allowed:
                close = difflib.get_close_matches(field, sorted(known), n=1, cutoff=0.6)
                suggestion = (prefix + close[0].upper()) if close else None
                return unknown_setting_message(name, suggestion)
    return None
