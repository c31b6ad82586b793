"""Service settings: one typed tree loaded from flags, ``SI_SDF__…`` env vars and a TOML file.

Precedence is flags > environment > config file > defaults, as upstream's layered config. Env
names follow the tree with ``__`` between levels, e.g.
``SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__HOSTNAME``. The config file is TOML with the same
tree (``[layer_db_config.pg_pool_config]``), found via ``--config`` or ``SI_SDF_CONFIG``.

Unknown keys are errors, not silently ignored: a typo in a setting name must not run a job
against defaults. Passwords and secret keys are ``SecretStr`` and never printed.
Nothing here reads the environment until ``load_settings`` is called.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from layer_cache.errors import LayerCacheError

ENV_PREFIX = "SI_SDF__"
CONFIG_FILE_ENV = "SI_SDF_CONFIG"


class SettingsError(LayerCacheError):
    """A setting is missing, unknown or invalid; the message names it."""


class MigrationMode(StrEnum):
    """What the process does: serve, set up the schema, or run a migration job."""

    RUN = "run"
    RUN_AND_QUIT = "runAndQuit"
    SKIP = "skip"
    BACKFILL_LAYER_CACHE = "backfillLayerCache"


class PersisterMode(StrEnum):
    """Where the layer cache writes and reads (upstream's serde names)."""

    POSTGRES_ONLY = "PostgresOnly"
    DUAL_WRITE = "DualWrite"
    S3_PRIMARY = "S3Primary"
    S3_ONLY = "S3Only"

    @property
    def uses_s3(self) -> bool:
        """True when S3 is part of the write path (so there is a bucket to backfill)."""
        return self is not PersisterMode.POSTGRES_ONLY


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PgSslMode(StrEnum):
    """libpq's sslmode values, as asyncpg accepts them."""

    DISABLE = "disable"
    ALLOW = "allow"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"


class PgPoolConfig(_Section):
    """The layer-db Postgres connection."""

    hostname: str = "localhost"
    port: int = Field(5432, ge=1, le=65535)
    user: str = "si"
    password: SecretStr = SecretStr("bugbear")
    dbname: str = "si_layer_db"
    application_name: str = "si-layer-db"
    pool_max_size: int = Field(default_factory=lambda: max(32, (os.cpu_count() or 1) * 4), ge=1)
    sslmode: PgSslMode = PgSslMode.PREFER
    ssl_ca_cert: Path | None = None
    connect_timeout_secs: float = Field(10.0, gt=0)


class StaticCredentials(_Section):
    """An access key pair."""

    access_key: str = "siadmin"
    secret_key: SecretStr = SecretStr("bugbear")


class StaticCredentialsAuth(_Section):
    """``auth.static_credentials``: sign with a fixed key pair."""

    static_credentials: StaticCredentials = StaticCredentials()


IAM_ROLE = "iam_role"


class ObjectStorageConfig(_Section):
    """The S3-compatible object store the layer cache writes to."""

    endpoint: str = "http://localhost:9200"
    bucket_prefix: str = "si-layer-cache"
    bucket_suffix: str | None = None
    region: str = "us-east-1"
    key_prefix: str | None = None
    # ``iam_role`` uses the standard AWS credential chain (and its endpoint and region).
    auth: Annotated[StaticCredentialsAuth | Literal["iam_role"], NoDecode] = StaticCredentialsAuth()

    @field_validator("auth", mode="before")
    @classmethod
    def _plain_iam_role(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.strip().lower() != IAM_ROLE:
            raise ValueError(
                f"must be {IAM_ROLE!r} or a static_credentials section "
                "(…__AUTH__STATIC_CREDENTIALS__ACCESS_KEY and …__SECRET_KEY)"
            )
        return IAM_ROLE


class LayerDbConfig(_Section):
    """The layer cache's storage."""

    persister_mode: PersisterMode = PersisterMode.POSTGRES_ONLY
    pg_pool_config: PgPoolConfig = PgPoolConfig()
    object_storage_config: ObjectStorageConfig = ObjectStorageConfig()


_config_file: ContextVar[Path | None] = ContextVar("_config_file", default=None)


class _TomlFileSource(PydanticBaseSettingsSource):
    """The optional TOML config file, the lowest-precedence source."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole file at once

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        if path is None:
            return {}
        try:
            with path.open("rb") as handle:
                return tomllib.load(handle)
        except OSError as exc:
            raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc


class ServerConfig(_Section):
    """The layer cache server's tunables (``SI_SDF__SERVER__…``)."""

    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_bulk_keys: int = Field(1000, ge=1, le=100_000)
    grace_period_secs: float = Field(25.0, ge=0)
    readiness_timeout_secs: float = Field(2.0, gt=0)
    writeback_queue_size: int = Field(10_000, ge=1)
    writeback_queue_bytes: int = Field(256 * 1024 * 1024, ge=1)
    writeback_workers: int = Field(4, ge=1, le=256)


class Settings(BaseSettings):
    """The root of every service setting."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    migration_mode: MigrationMode = MigrationMode.RUN
    layer_db_config: LayerDbConfig = LayerDbConfig()
    socket_addr: str = "0.0.0.0:5156"
    metrics_port: int | None = Field(None, ge=0, le=65535)
    server: ServerConfig = ServerConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlFileSource(settings_cls)


def setting_env_name(loc: tuple[int | str, ...], prefix: str = ENV_PREFIX) -> str:
    """The env var for a validation error location, e.g. SI_SDF__LAYER_DB_CONFIG__…."""
    return prefix + "__".join(str(part).upper() for part in loc if isinstance(part, str))


def describe_validation_error(exc: ValidationError, name_of: Any) -> str:
    """One line for the first problem in a pydantic ``ValidationError``."""
    first = exc.errors()[0]
    where = name_of(first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown setting {where}"
    if first["type"] == "missing":
        return f"{where} is required"
    error = first.get("ctx", {}).get("error")
    reason = str(error) if isinstance(error, ValueError) else first["msg"]
    return f"invalid {where}: {reason[:1].lower()}{reason[1:]}"


def unknown_env_var(
    environ: Mapping[str, str], prefix: str, fields: Iterable[str], *, nested: bool = True
) -> str | None:
    """The first env var under ``prefix`` that names no field: pydantic-settings ignores
    unknown top-level variables, and a typo there must not run a job on a default."""
    known = set(fields)
    for name in environ:
        upper = name.upper()
        if upper.startswith(prefix):
            rest = upper[len(prefix) :]
            field = (rest.split("__", 1)[0] if nested else rest).lower()
            if field not in known:
                return name
    return None


def load_settings(
    overrides: Mapping[str, Any] | None = None, *, config_file: Path | None = None
) -> Settings:
    """Load the settings tree; flags come in as ``overrides`` and win over everything."""
    if config_file is None and os.environ.get(CONFIG_FILE_ENV):
        config_file = Path(os.environ[CONFIG_FILE_ENV])
    unknown = unknown_env_var(os.environ, ENV_PREFIX, Settings.model_fields)
    if unknown is not None:
        raise SettingsError(f"unknown setting {unknown}")
    token = _config_file.set(config_file)
    try:
        return Settings(**dict(overrides or {}))
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, setting_env_name)) from None
    finally:
        _config_file.reset(token)
