"""Service settings: one typed tree loaded from flags, ``SI_SDF__…`` env vars and a TOML file.

Precedence is flags > environment > config file > defaults, as upstream's layered config. Env
names follow the tree with ``__`` between levels, e.g.
``SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__HOSTNAME``. The config file is TOML with the same
tree (``[layer_db_config.pg_pool_config]``), found via ``--config`` or ``SI_SDF_CONFIG``.

Operators run this program with upstream sdf's whole environment (its ConfigMap), so every name
is classified against one registry before anything is validated (``classify_setting``):
*used* (a field of our tree, some under upstream's names such as the pg ``certificate``),
*ignored* (``UPSTREAM_SDF_SETTINGS``: upstream sdf defines it and it means nothing here; accepted,
and named, never with its value, in one debug line) or *unknown*: an error with a "did you mean"
suggestion, so a typo in a name we read never runs a job on a default. The TOML file is
classified the same way. Passwords and secret keys are ``SecretStr`` and never printed.
Nothing here reads the environment until ``load_settings`` is called.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import structlog
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from layer_cache.errors import SettingsError
from layer_cache.eviction import DEFAULT_POLICY, PolicyName
from layer_cache.persister import PersisterMode
from services.units import ByteSize

ENV_PREFIX = "SI_SDF__"
CONFIG_FILE_ENV = "SI_SDF_CONFIG"

log = structlog.get_logger("services")


class MigrationMode(StrEnum):
    """What the process does: serve, set up the schema, or run a migration job."""

    RUN = "run"
    RUN_AND_QUIT = "runAndQuit"
    SKIP = "skip"
    BACKFILL_LAYER_CACHE = "backfillLayerCache"


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


class CertificateKind(StrEnum):
    """Where upstream's ``certificate.source`` comes from (si-tls ``CertificateSource``)."""

    PATH = "path"
    BASE64 = "base64"
    AS_STRING = "as_string"
    REMOTE = "remote"


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL
)


def parse_ca_certificates(data: bytes) -> str | bytes | None:
    """The CA certificates in ``data``, read as upstream's si-tls reads a certificate source's
    bytes: the PEM certificates if there are any (as text), else the trimmed text as base64 of
    DER, else raw DER (it starts with an ASN.1 SEQUENCE, 0x30); None when it is none of these.
    What comes back is ``ssl``'s ``cadata``: text is PEM, bytes are DER."""
    blocks = _PEM_CERTIFICATE.findall(data)
    if blocks:
        return "\n".join(block.decode("ascii", "replace") for block in blocks) + "\n"
    try:
        der = base64.b64decode(data.decode("utf-8").strip(), validate=True)
    except (UnicodeDecodeError, binascii.Error, ValueError):
        der = b""
    if der:
        return der
    if data[:1] == b"\x30":
        return data
    return None


class PgCertificate(_Section):
    """Upstream's ``pg_pool_config.certificate``: the CA the server's certificate must chain to.

    ``remote`` is a URL, fetched once when the pool opens (``services.pg_tls``).
    """

    type: CertificateKind
    source: str

    @model_validator(mode="after")
    def _readable_source(self) -> PgCertificate:
        if self.type is CertificateKind.BASE64:
            try:
                base64.b64decode(self.source, validate=True)
            except binascii.Error:
                raise ValueError("source is not valid base64") from None
        inline = self.type in (CertificateKind.BASE64, CertificateKind.AS_STRING)
        if inline and self.pem_or_der is None:
            raise ValueError(f"source ({self.type}) holds no PEM, base64 DER or DER certificate")
        if self.type is CertificateKind.REMOTE:
            url = urlsplit(self.source)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError("source must be an http:// or https:// URL for type remote")
        return self

    @property
    def pem_or_der(self) -> str | bytes | None:
        """The CA itself for base64 / as_string sources (``ssl`` cadata), None for a path or a
        URL. A base64 source decodes to the bytes of a file, often a PEM one (a Kubernetes
        Secret's base64 of ``ca.pem``); both are read as upstream reads them."""
        if self.type is CertificateKind.BASE64:
            return parse_ca_certificates(base64.b64decode(self.source))
        if self.type is CertificateKind.AS_STRING:
            return parse_ca_certificates(self.source.encode())
        return None


class PgPoolConfig(_Section):
    """The layer-db Postgres connection.

    Upstream names used here: ``certificate`` (a path source becomes ``ssl_ca_cert``, and without
    an explicit ``sslmode`` the server is verified as upstream does: ``verify-full``),
    ``pool_timeout_create_secs`` (the connect timeout unless ``connect_timeout_secs`` is set),
    ``pool_idle_connection_lifetime_secs`` (asyncpg's ``max_inactive_connection_lifetime``) and
    ``pool_total_connection_lifetime_secs`` (a connection is retired at that age, upstream's
    default 20 h: RDS Proxy closes connections at 24 h; ``services.pg_lifetime``).
    ``statement_cache_size`` 0 turns asyncpg's prepared-statement cache off (pgbouncer in
    transaction or statement pool mode).
    """

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
    statement_cache_size: int = Field(100, ge=0)
    certificate: PgCertificate | None = None
    pool_timeout_create_secs: float | None = Field(None, gt=0)
    pool_idle_connection_lifetime_secs: float | None = Field(None, ge=0)
    pool_total_connection_lifetime_secs: float = Field(20 * 3600.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_upstream_names(cls, data: Any) -> Any:
        """Upstream's certificate and create timeout fill our fields when those are not set."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        certificate = data.get("certificate")
        if isinstance(certificate, PgCertificate):
            certificate = certificate.model_dump()
        if isinstance(certificate, Mapping) and certificate:
            data.setdefault("sslmode", PgSslMode.VERIFY_FULL.value)
            if certificate.get("type") == CertificateKind.PATH.value:
                data.setdefault("ssl_ca_cert", certificate.get("source"))
        if data.get("pool_timeout_create_secs") is not None:
            data.setdefault("connect_timeout_secs", data["pool_timeout_create_secs"])
        return data

    @property
    def ssl_ca_data(self) -> str | bytes | None:
        """A CA given inline (upstream's base64 / as_string certificate), for ``cadata``."""
        if self.certificate is None or self.ssl_ca_cert is not None:
            return None
        return self.certificate.pem_or_der


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
    # The PEM file of the CA(s) an https endpoint's certificate must chain to, instead of the
    # default bundle (a private CA: MinIO or Ceph on premises). Unset: botocore's default, which
    # AWS_CA_BUNDLE also sets.
    ca_bundle: Path | None = None
    # ``iam_role`` uses the standard AWS credential chain (and its endpoint and region).
    auth: Annotated[StaticCredentialsAuth | Literal["iam_role"], NoDecode] = StaticCredentialsAuth()

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        """An endpoint botocore can use: http(s), a host, a valid port (checked before any
        client is built, so a bad one is one line, not a traceback)."""
        parts = urlsplit(value.strip())
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            raise ValueError(f"{value!r} has an invalid port") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            hint = f"; did you mean https://{value.strip()}?" if "://" not in value else ""
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host{hint}")
        return value.strip()

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


class CacheConfig(_Section):
    """Upstream's ``layer_db_config.cache_config``: the size and place of the server's cache
    tier (``services.cache_sizing``, docs/server.md).

    The memory tier is ``memory_usable_max_percent`` of what ``memory_reserved_percent`` leaves
    of the pod's memory limit; the disk tier (``disk_layer``) is the same for the volume holding
    ``disk_path`` (unset: ``cache`` inside the server's write queue directory, on its volume;
    upstream's default is a fresh temporary directory), which also keeps
    ``disk_reserved_percent`` of the volume free for the write queue. ``disk_admission_rate_limit``
    caps the bytes a second written to the disk tier (0: no cap) and ``disk_buffer_size`` the
    values waiting to be written. Upstream overrides the two usable percents per cache with
    fixed shares that add up to 100; here they scale the one tier every cache shares.
    """

    memory_reserved_percent: int = Field(40, ge=0, le=100)
    memory_usable_max_percent: int = Field(100, ge=0, le=100)
    disk_layer: bool = True
    disk_reserved_percent: int = Field(5, ge=0, le=100)
    disk_usable_max_percent: int = Field(100, ge=0, le=100)
    disk_path: Path | None = None
    disk_admission_rate_limit: ByteSize = Field(1024 * 1024 * 1024, ge=0)
    disk_buffer_size: ByteSize = Field(128 * 1024 * 1024, ge=1)


class LayerDbConfig(_Section):
    """The layer cache's storage."""

    persister_mode: PersisterMode = PersisterMode.POSTGRES_ONLY
    pg_pool_config: PgPoolConfig = PgPoolConfig()
    object_storage_config: ObjectStorageConfig = ObjectStorageConfig()
    cache_config: CacheConfig = CacheConfig()


_config_file_tables: ContextVar[dict[str, Any] | None] = ContextVar(
    "_config_file_tables", default=None
)


class _TomlFileSource(PydanticBaseSettingsSource):
    """The optional TOML config file (read and classified by ``load_settings``), lowest."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole file at once

    def __call__(self) -> dict[str, Any]:
        return _config_file_tables.get() or {}


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML config file's tables; an unreadable or invalid file is a SettingsError."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc


class ServerAuth(StrEnum):
    """Whether the server asks for bearer tokens (``tokens``, the default) or lets every client
    read and write (``none``: only on purpose, e.g. behind a mesh that authenticates)."""

    TOKENS = "tokens"
    NONE = "none"


class ServerConfig(_Section):
    """The layer cache server's tunables (``SI_SDF__SERVER__…``)."""

    # Access control (layer_cache_server.auth): token files, one token a line, re-read on change.
    auth: ServerAuth = ServerAuth.TOKENS
    read_tokens_file: Path | None = None
    write_tokens_file: Path | None = None
    # TLS (layer_cache_server.tls): certificate and key reloaded on change; a client CA for mTLS.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    max_body_bytes: ByteSize = Field(64 * 1024 * 1024, ge=1)
    max_bulk_keys: int = Field(1000, ge=1, le=100_000)
    grace_period_secs: float = Field(25.0, ge=0)
    readiness_timeout_secs: float = Field(2.0, gt=0)
    # The durable S3 write queue and the Postgres retry queue (layer_cache.write_queue), used in
    # DualWrite and S3Primary. Every failed write is retried; the caps are opt-in (None: off).
    write_queue_dir: Path = Path("/var/lib/si-layer-cache/write-queue")
    write_queue_workers: int = Field(32, ge=1, le=256)
    write_queue_max_attempts: int | None = Field(None, ge=1)
    write_queue_max_age_secs: float | None = Field(None, gt=0)
    write_queue_base_delay_secs: float = Field(0.5, gt=0)
    write_queue_max_delay_secs: float = Field(60.0, gt=0)
    # While requests are in flight the queues drain one write at a time, more as their oldest
    # due entry ages, all workers at this lag; 0 never yields.
    write_queue_yield_lag_secs: float = Field(60.0, ge=0)
    retry_queue_workers: int = Field(4, ge=1, le=64)

    # The cache tier (layer_cache.cache_tier); sized by layer_db_config.cache_config's shares
    # unless these give bytes (0 turns a tier off).
    cache_memory_bytes: ByteSize | None = Field(None, ge=0)
    cache_disk_bytes: ByteSize | None = Field(None, ge=0)
    cache_max_entry_percent: float = Field(10.0, gt=0, le=100)
    cache_eviction_policy: PolicyName = DEFAULT_POLICY

    @model_validator(mode="after")
    def _consistent_access(self) -> ServerConfig:
        tokens = self.read_tokens_file or self.write_tokens_file
        if self.auth is ServerAuth.NONE and tokens:
            raise ValueError(
                "AUTH is none but a TOKENS_FILE is set; drop SI_SDF__SERVER__AUTH=none to ask "
                "for the tokens, or the token files to run the server open"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "SI_SDF__SERVER__TLS_CERT_FILE and __TLS_KEY_FILE go together: set both or neither"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "SI_SDF__SERVER__TLS_CLIENT_CA_FILE (mutual TLS) needs __TLS_CERT_FILE and "
                "__TLS_KEY_FILE"
            )
        return self


UPSTREAM_BACKFILL_PREFIX = "backfill_"


class Settings(BaseSettings):
    """The root of every service setting."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        env_ignore_empty=True,  # as upstream's config crate source: an empty value is unset
    )

    migration_mode: MigrationMode = MigrationMode.RUN
    layer_db_config: LayerDbConfig = LayerDbConfig()
    socket_addr: str = "0.0.0.0:5156"
    metrics_port: int | None = Field(None, ge=0, le=65535)
    server: ServerConfig = ServerConfig()
    # Upstream sdf's backfill settings (``SI_SDF__BACKFILL_…``): below the flags and
    # ``SI_BACKFILL_…``, validated with them by migrations_mode.config.
    backfill_cutoff_timestamp: str | None = None
    backfill_cache_types: str | None = None
    backfill_key_batch_size: int | None = None
    backfill_checkpoint_interval_secs: float | None = None
    backfill_max_concurrent_uploads: int | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _UsedEnvSource(settings_cls), _TomlFileSource(settings_cls)

    def upstream_backfill_options(self) -> dict[str, Any]:
        """Upstream's backfill settings that were given, by backfill option name."""
        return {
            name.removeprefix(UPSTREAM_BACKFILL_PREFIX): getattr(self, name)
            for name in type(self).model_fields
            if name.startswith(UPSTREAM_BACKFILL_PREFIX) and getattr(self, name) is not None
        }


# --------------------------------------------------------------------------------------------
# Upstream sdf's settings, and how every name is classified


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
class _Node:
    use: SettingUse
    children: dict[str, _Node] = field(default_factory=dict)
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


def _add_model_fields(node: _Node, model: type[BaseModel]) -> None:
    for name, info in model.model_fields.items():
        child = node.children.setdefault(name, _Node(SettingUse.USED))
        for inner in _models_in(info.annotation):
            _add_model_fields(child, inner)


def setting_tree(
    model: type[BaseModel], upstream: Iterable[UpstreamSetting] = UPSTREAM_SDF_SETTINGS
) -> _Node:
    """Every name this program reads (the model's fields) plus upstream's ignored ones."""
    root = _Node(SettingUse.USED)
    _add_model_fields(root, model)
    for setting in upstream:
        if setting.use is not SettingUse.IGNORED:
            continue
        node = root
        for part in setting.path.split("."):
            node = node.children.setdefault(part, _Node(SettingUse.IGNORED))
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


def classify_setting(tree: _Node, path: Sequence[str]) -> Classified:
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


def _suggest(tree: _Node, path: Sequence[str], depth: int, node: _Node) -> tuple[str, ...] | None:
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


Suggested = tuple[tuple[str, str | None], ...]  # names, each with the closest known one


@dataclass(frozen=True, slots=True)
class SourceNames:
    """The names one source gave, split by verdict (the unknown ones with a suggestion)."""

    used: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    unknown: Suggested = ()
    tolerated: Suggested = ()  # unknown, but where upstream ignores what it lacks: warned of

    def raise_for_unknown(self, where: str = "") -> None:
        """One SettingsError line for the first unknown name, if any."""
        if self.unknown:
            name, suggestion = self.unknown[0]
            raise SettingsError(unknown_setting_message(name, suggestion) + where)

    def warn_of_tolerated(self, where: str = "") -> None:
        """One warning per unknown name below a section upstream owns (it runs on)."""
        for name, suggestion in self.tolerated:
            log.warning(
                "unknown setting ignored",
                name=name,
                closest_known=suggestion,
                reason="no setting of this program or of upstream sdf has this name; upstream "
                "ignores unknown names in its sections, and so does this program" + where,
            )


def classify_environment(
    environ: Mapping[str, str], tree: _Node, prefix: str = ENV_PREFIX
) -> SourceNames:
    """Every ``prefix`` env var, classified (names sorted, so errors are reproducible)."""
    used: list[str] = []
    ignored: list[str] = []
    unknown: list[tuple[str, str | None]] = []
    tolerated: list[tuple[str, str | None]] = []
    for name in sorted(environ):
        if not name.upper().startswith(prefix):
            continue
        verdict = classify_setting(tree, env_setting_path(name, prefix))
        if verdict.use is SettingUse.USED:
            used.append(name)
        elif verdict.use is SettingUse.IGNORED:
            ignored.append(name)
        else:
            suggestion = verdict.suggestion
            entry = (name, None if suggestion is None else env_setting_name(suggestion))
            (tolerated if verdict.tolerated else unknown).append(entry)
    return SourceNames(tuple(used), tuple(ignored), tuple(unknown), tuple(tolerated))


def prune_config_file(data: Mapping[str, Any], tree: _Node) -> tuple[dict[str, Any], SourceNames]:
    """The config file's tables without upstream's ignored names, and every name classified."""
    ignored: list[str] = []
    unknown: list[tuple[str, str | None]] = []
    tolerated: list[tuple[str, str | None]] = []

    def walk(table: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        kept: dict[str, Any] = {}
        for key, value in table.items():
            here = (*path, key)
            verdict = classify_setting(tree, here)
            if verdict.use is SettingUse.IGNORED:
                ignored.append(".".join(here))
            elif verdict.use is SettingUse.UNKNOWN:
                suggestion = verdict.suggestion
                entry = (".".join(here), None if suggestion is None else ".".join(suggestion))
                (tolerated if verdict.tolerated else unknown).append(entry)
            elif isinstance(value, Mapping):
                kept[key] = walk(value, here)
            else:
                kept[key] = value
        return kept

    kept = walk(data, ())
    return kept, SourceNames((), tuple(ignored), tuple(unknown), tuple(tolerated))


class _UsedEnvSource(EnvSettingsSource):
    """The ``SI_SDF__`` environment without upstream's ignored names (they are not fields)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        tree = setting_tree(Settings)
        prefix = ENV_PREFIX.lower()
        return {
            name: value
            for name, value in super()._load_env_vars().items()
            if not name.startswith(prefix)
            or classify_setting(tree, env_setting_path(name.upper())).use is SettingUse.USED
        }


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


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    ignored_flags: Sequence[str] = (),
) -> Settings:
    """Load the settings tree; flags come in as ``overrides`` (nested like the tree) and win
    over everything.

    Upstream sdf's names that mean nothing here are dropped and listed (names only: values may
    be secrets) in one debug line, ``ignored upstream sdf settings``, with ``ignored_flags``
    (sdf's flags given that mean nothing here). An unknown name where upstream's loader would
    ignore it is one warning each (``unknown setting ignored``); any other is an error.
    """
    if config_file is None and os.environ.get(CONFIG_FILE_ENV):
        config_file = Path(os.environ[CONFIG_FILE_ENV])
    tree = setting_tree(Settings)
    from_env = classify_environment(os.environ, tree)
    from_env.raise_for_unknown()
    tables: dict[str, Any] = {}
    from_file = SourceNames()
    if config_file is not None:
        tables, from_file = prune_config_file(read_config_file(config_file), tree)
        from_file.raise_for_unknown(f" in config file {config_file}")
    from_env.warn_of_tolerated()
    from_file.warn_of_tolerated(f" (config file {config_file})")
    ignored = [*from_env.ignored, *from_file.ignored, *ignored_flags]
    if ignored:
        log.debug("ignored upstream sdf settings", names=ignored)
    token = _config_file_tables.set(tables)
    try:
        return Settings(**dict(overrides or {}))
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, setting_env_name)) from None
    finally:
        _config_file_tables.reset(token)
