"""Backfill options: raw flags and ``SI_BACKFILL_*`` env vars in, a validated config out.

Precedence, as upstream sdf: flags > ``SI_BACKFILL_*`` > upstream's ``SI_SDF__BACKFILL_*`` names
(and the config file's ``backfill_*`` keys, passed in as ``upstream``) > defaults;
``load_backfill_config`` builds these three sources itself on each call. Upstream's
``SI_BACKFILL_FUNC_RUN*_CUTOFF_ID`` are accepted and ignored (func runs are not backfilled here).
``load_backfill_config`` runs before any connection is opened. Every problem becomes one
``BackfillConfigError`` line naming the flag, its env var and what is allowed. The cutoff takes
RFC 3339 (any offset) and the form the checkpoint log prints (``2026-01-13 17:30:26.445817 UTC``),
so a logged checkpoint can be pasted straight back, or ``now``: the config then carries
``cutoff_is_now`` and the local UTC time of loading, and ``with_resolved_cutoff`` replaces that,
once connected, with the database's ``now()`` (rows get ``created_at`` from the database's clock,
so the pod's clock skew cannot leave rows out); the resolved instant is logged for a resume.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    SettingsConfigDict,
)

from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CACHE_SPECS, CacheType
from layer_cache.concurrency import ConcurrencyMode
from layer_cache.errors import BackfillConfigError
from layer_cache.retry import RetryPolicy
from migrations_mode.progress_store import ProgressStoreKind
from migrations_mode.walk import Shard, WalkOrder
from services.setting_names import ENV_PREFIX, unknown_env_var
from services.settings import describe_validation_error
from services.units import ByteSize

BACKFILL_ENV_PREFIX = "SI_BACKFILL_"
CUTOFF_NOW: Final = "now"
"""The cutoff value meaning "when the run starts, by the database's clock"."""
# Upstream sdf's SI_BACKFILL_ names for its func-run backfill: accepted, meaningless here.
UPSTREAM_ONLY_BACKFILL_ENV = ("func_runs_cutoff_id", "func_run_logs_cutoff_id")
# --backfill-max-concurrent-uploads when not given: upstream's 5 for fixed concurrency, where it
# is the number in flight; for tuned concurrency it is only the ceiling the limit climbs to.
DEFAULT_MAX_CONCURRENT_UPLOADS: Final[Mapping[ConcurrencyMode, int]] = {
    ConcurrencyMode.FIXED: 5,
    ConcurrencyMode.TUNED: 64,
}

_TIMESTAMP = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<fraction>\d+))?"
    r"\s*(?P<zone>[Zz]|UTC|[+-]\d{2}:?\d{2})$"
)


def parse_cutoff(text: str) -> datetime:
    """An aware UTC datetime from RFC 3339 or the checkpoint log's ``… UTC`` form."""
    match = _TIMESTAMP.match(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a timestamp with a zone; use RFC 3339 "
            "(2026-01-13T17:30:26.445817Z) or the logged form (2026-01-13 17:30:26.445817 UTC)"
        )
    # Postgres keeps microseconds: finer digits cannot select a different row, so drop them.
    fraction = (match["fraction"] or "0")[:6].ljust(6, "0")
    zone = match["zone"].upper()
    offset = "+00:00" if zone in ("Z", "UTC") else f"{zone[:3]}:{zone[-2:]}"
    try:
        parsed = datetime.fromisoformat(f"{match['date']}T{match['time']}.{fraction}{offset}")
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid timestamp: {exc}") from None
    return parsed.astimezone(UTC)


def format_checkpoint(timestamp: datetime) -> str:
    """The logged form of a cutoff, which ``parse_cutoff`` reads back exactly."""
    return timestamp.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


def parse_cache_types(text: str) -> frozenset[CacheType]:
    """Comma-separated backfillable cache names; blanks dropped, duplicates collapsed."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"must name at least one of: {', '.join(BACKFILLABLE_CACHE_TYPES)}")
    selected = set()
    for name in names:
        try:
            cache_type = CacheType(name)
        except ValueError:
            raise ValueError(
                f"unknown cache type {name!r}; allowed: {', '.join(BACKFILLABLE_CACHE_TYPES)}"
            ) from None
        if not CACHE_SPECS[cache_type].backfillable:
            raise ValueError(
                f"cache type {name!r} is not backfillable; allowed: "
                f"{', '.join(BACKFILLABLE_CACHE_TYPES)}"
            )
        selected.add(cache_type)
    return frozenset(selected)


def _cutoff(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return CUTOFF_NOW if value.strip().lower() == CUTOFF_NOW else parse_cutoff(value)


def _cache_types(value: Any) -> Any:
    return parse_cache_types(value) if isinstance(value, str) else value


class BackfillSettings(BaseSettings):
    """The backfill's options, from the sources ``load_backfill_config`` builds."""

    model_config = SettingsConfigDict(env_prefix=BACKFILL_ENV_PREFIX, extra="ignore", frozen=True)

    cutoff_timestamp: Annotated[datetime | Literal["now"], BeforeValidator(_cutoff)]
    cache_types: Annotated[frozenset[CacheType], NoDecode, BeforeValidator(_cache_types)]
    key_batch_size: int = Field(1000, ge=1, le=100_000)
    checkpoint_interval_secs: float = Field(30, gt=0)
    max_concurrent_uploads: int | None = Field(None, ge=1, le=1024)
    concurrency: ConcurrencyMode = ConcurrencyMode.TUNED
    grace_period_secs: float = Field(20, ge=0)
    restart: bool = False
    progress_store: ProgressStoreKind = ProgressStoreKind.AUTO
    retry_max_attempts: int = Field(8, ge=1, le=100)
    retry_max_secs: float = Field(120, gt=0)
    order: WalkOrder = WalkOrder.KEY
    shard_index: int | None = Field(None, ge=0)
    shard_count: int = Field(1, ge=1, le=65536)
    max_inflight_bytes: ByteSize = Field(64 * 1024 * 1024, ge=1024 * 1024)
    max_uploads_per_second: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_bytes_per_second: ByteSize | None = Field(None, gt=0)
    verify: bool = False
    verify_content: bool = False
    repair: bool = False
    verify_report: Path | None = None
    dry_run: bool = False

    @field_validator("verify_report")
    @classmethod
    def _writable_report(cls, path: Path | None) -> Path | None:
        """A file that can be created or replaced, checked before anything runs."""
        if path is None:
            return None
        if path.is_dir():
            raise ValueError(f"{path} is a directory; name a file")
        parent = path.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ValueError(f"cannot write a file in {parent}")
        return path


class VerifyMode(StrEnum):
    """Copy (off); compare S3 with Postgres by size or by content, writing nothing; or compare
    by content and re-upload what differs (repair)."""

    OFF = "off"
    SIZE = "size"
    CONTENT = "content"
    REPAIR = "repair"

    @property
    def writes(self) -> bool:
        """PUTs objects and keeps progress."""
        return self in (VerifyMode.OFF, VerifyMode.REPAIR)

    @property
    def compares(self) -> bool:
        """Compares each row with its object and reports differences."""
        return self is not VerifyMode.OFF


@dataclass(frozen=True, slots=True)
class BackfillConfig:
    """A validated backfill: what to copy, in what pieces, how fast."""

    cutoff: datetime
    cache_types: tuple[CacheType, ...]  # in registry order, each once
    key_batch_size: int
    checkpoint_interval: timedelta
    max_concurrent_uploads: int
    grace_period: timedelta
    concurrency: ConcurrencyMode = ConcurrencyMode.TUNED
    restart: bool = False
    progress_store: ProgressStoreKind = ProgressStoreKind.AUTO
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    order: WalkOrder = WalkOrder.KEY
    shard: Shard = field(default_factory=Shard)
    max_inflight_bytes: int = 64 * 1024 * 1024
    max_uploads_per_second: float | None = None  # for the whole process; None: no limit
    max_bytes_per_second: int | None = None  # value bytes, for the whole process
    verify: VerifyMode = VerifyMode.OFF
    verify_report: Path | None = None
    dry_run: bool = False
    cutoff_is_now: bool = False
    """``--backfill-cutoff-timestamp now`` not yet resolved: ``cutoff`` is the local clock at
    load time until ``with_resolved_cutoff`` sets the database's."""

    @property
    def value_chunk_bytes(self) -> int:
        """Bytes of values read per Postgres round trip: half the in-flight budget, so one chunk
        can be read while the previous one uploads."""
        return max(1, self.max_inflight_bytes // 2)


def flag_for(field: str) -> str:
    """The CLI flag for a backfill option field."""
    return "--backfill-" + field.replace("_", "-")


def _flag_and_env(loc: tuple[int | str, ...], upstream: Mapping[str, Any]) -> str:
    """The flag and env vars of an option, upstream's too when it came from there."""
    field = str(loc[0])
    names = f"{BACKFILL_ENV_PREFIX}{field.upper()}"
    if field in upstream:
        names += f" or {ENV_PREFIX}BACKFILL_{field.upper()}"
    return f"{flag_for(field)} ({names})"


def load_backfill_config(
    flags: Mapping[str, Any], upstream: Mapping[str, Any] | None = None
) -> BackfillConfig:
    """Validate flags (None = not given) over ``SI_BACKFILL_*`` env over ``upstream`` (sdf's
    ``backfill_*`` settings, by option name) into a ``BackfillConfig``."""
    given = {name: value for name, value in flags.items() if value is not None}
    upstream_options = dict(upstream or {})
    unknown = unknown_env_var(
        os.environ,
        BACKFILL_ENV_PREFIX,
        BackfillSettings.model_fields,
        nested=False,
        ignored=UPSTREAM_ONLY_BACKFILL_ENV,
    )
    if unknown is not None:
        raise BackfillConfigError(unknown)
    sources = (
        InitSettingsSource(BackfillSettings, given),
        EnvSettingsSource(BackfillSettings),
        InitSettingsSource(BackfillSettings, upstream_options),
    )
    try:
        options = BackfillSettings(_build_sources=(sources, given))
    except ValidationError as exc:
        name_of = functools.partial(_flag_and_env, upstream=upstream_options)
        raise BackfillConfigError(describe_validation_error(exc, name_of)) from None
    _refuse_conflicting_modes(options)
    cutoff = options.cutoff_timestamp
    return BackfillConfig(
        cutoff=datetime.now(UTC) if cutoff == CUTOFF_NOW else cutoff,
        cutoff_is_now=cutoff == CUTOFF_NOW,
        cache_types=tuple(c for c in BACKFILLABLE_CACHE_TYPES if c in options.cache_types),
        key_batch_size=options.key_batch_size,
        checkpoint_interval=timedelta(seconds=options.checkpoint_interval_secs),
        max_concurrent_uploads=(
            options.max_concurrent_uploads or DEFAULT_MAX_CONCURRENT_UPLOADS[options.concurrency]
        ),
        concurrency=options.concurrency,
        grace_period=timedelta(seconds=options.grace_period_secs),
        restart=options.restart,
        progress_store=options.progress_store,
        retry_policy=RetryPolicy(
            max_attempts=options.retry_max_attempts, max_elapsed_s=options.retry_max_secs
        ),
        order=options.order,
        shard=_shard(options),
        max_inflight_bytes=options.max_inflight_bytes,
        max_uploads_per_second=options.max_uploads_per_second,
        max_bytes_per_second=options.max_bytes_per_second,
        dry_run=options.dry_run,
        verify=_verify_mode(options),
        verify_report=options.verify_report,
    )


def _verify_mode(options: BackfillSettings) -> VerifyMode:
    if options.repair:
        return VerifyMode.REPAIR
    if options.verify_content:
        return VerifyMode.CONTENT
    return VerifyMode.SIZE if options.verify else VerifyMode.OFF


def _refuse_conflicting_modes(options: BackfillSettings) -> None:
    """One run does one thing: copy, estimate (dry run), compare (verify) or repair; a report
    needs a comparison."""
    comparing = [flag_for(name) for name in ("verify", "verify_content") if getattr(options, name)]
    if options.dry_run and (comparing or options.repair):
        other = comparing[0] if comparing else flag_for("repair")
        raise BackfillConfigError(
            f"{flag_for('dry_run')} and {other} are different runs (a dry run estimates a "
            "copy, a verification compares S3 with Postgres, a repair re-uploads what differs); "
            "pass one of them"
        )
    if options.repair and comparing:
        raise BackfillConfigError(
            f"{flag_for('repair')} compares content itself (an ETag that is the row's MD5, "
            f"else the bytes); drop {comparing[0]}"
        )
    if options.verify_report is not None and not (comparing or options.repair):
        raise BackfillConfigError(
            f"{flag_for('verify_report')} reports what a comparison finds; add "
            f"{flag_for('verify')}, {flag_for('verify_content')} or {flag_for('repair')}"
        )


def repair_flags(config: BackfillConfig, cache_types: Sequence[CacheType]) -> str:
    """The flags of the repair that goes with a verification: same cutoff, order and shard
    (the environment, key prefix included, is the same)."""
    flags = [
        "--migration-mode backfillLayerCache",
        flag_for("repair"),
        f"{flag_for('cutoff_timestamp')} '{format_checkpoint(config.cutoff)}'",
        f"{flag_for('cache_types')} {','.join(cache_types)}",
    ]
    if config.order is not WalkOrder.KEY:
        flags.append(f"{flag_for('order')} {config.order.value}")
    if config.shard.count > 1:
        flags.append(f"{flag_for('shard_index')} {config.shard.index}")
        flags.append(f"{flag_for('shard_count')} {config.shard.count}")
    return " ".join(flags)


def with_resolved_cutoff(config: BackfillConfig, database_now: datetime) -> BackfillConfig:
    """``config`` with a ``now`` cutoff set to ``database_now`` (microseconds, UTC); any other
    cutoff is returned unchanged."""
    if not config.cutoff_is_now:
        return config
    if database_now.tzinfo is None:
        raise ValueError("the database clock must be an aware timestamp")
    return replace(config, cutoff=database_now.astimezone(UTC), cutoff_is_now=False)


def _shard(options: BackfillSettings) -> Shard:
    """The shard from the flags, or Kubernetes' ``JOB_COMPLETION_INDEX`` in an Indexed Job."""
    index = options.shard_index
    if index is None:
        completion_index = os.environ.get("JOB_COMPLETION_INDEX", "").strip()
        index = int(completion_index) if completion_index.isdigit() else 0
    if index >= options.shard_count:
        raise BackfillConfigError(
            f"invalid --backfill-shard-index (SI_BACKFILL_SHARD_INDEX or JOB_COMPLETION_INDEX): "
            f"{index} is not below --backfill-shard-count {options.shard_count}"
        )
    return Shard(index, options.shard_count)
