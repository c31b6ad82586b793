"""Service settings: one typed tree loaded from flags, ``SI_SDF__…`` env vars and a TOML file.

Precedence is flags > environment > config file > defaults, as upstream's layered config. Env
names follow the tree with ``__`` between levels, e.g.
``SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__HOSTNAME``. The config file is TOML with the same
tree (``[layer_db_config.pg_pool_config]``), found via ``--config`` or ``SI_SDF_CONFIG``.

Operators run this program with upstream sdf's whole environment (its ConfigMap), so every name
is classified against one registry before anything is validated (``services.setting_names``):
*used* (a field of our tree, some under upstream's names such as the pg ``certificate``),
*ignored* (upstream sdf defines it and it means nothing here; accepted, and named, never with its
value, in one debug line) or *unknown*: an error with a "did you mean" suggestion, so a typo in a
name we read never runs a job on a default (one warning instead in a section upstream's loader
owns, as it ignores names it lacks there). The TOML file is classified the same way.

``load_settings`` builds the sources on each call and hands them to pydantic-settings
(``Settings(_build_sources=…)``), highest first: the flags, the environment as pydantic-settings'
``EnvSettingsSource`` reads it, and the config file's tables (read here with ``tomllib``: a
missing or invalid file is one line, where pydantic-settings' TOML source skips a missing file),
the last two without upstream's names. Nothing passes through module or context state, so two
loads at once each see only their own flags and file. Passwords and secret keys are
``SecretStr`` and never printed. Nothing here reads the environment until ``load_settings`` is
called.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as PydanticSettingsError

from layer_cache.errors import SettingsError
from layer_cache.eviction import DEFAULT_POLICY, PolicyName
from layer_cache.persister import PersisterMode
from services.setting_names import ENV_PREFIX as ENV_PREFIX  # the tree's prefix, re-exported
from services.setting_names import (
    UPSTREAM_BACKFILL_PREFIX,
    SettingNode,
    SettingUse,
    classify_setting,
    env_setting_name,
    env_setting_path,
    setting_tree,
    unknown_setting_message,
)
from services.units import ByteSize

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

    def upstream_backfill_options(self) -> dict[str, Any]:
        """Upstream's backfill settings that were given, by backfill option name."""
        return {
            name.removeprefix(UPSTREAM_BACKFILL_PREFIX): getattr(self, name)
            for name in type(self).model_fields
            if name.startswith(UPSTREAM_BACKFILL_PREFIX) and getattr(self, name) is not None
        }


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
    environ: Mapping[str, str], tree: SettingNode, prefix: str = ENV_PREFIX
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


def prune_upstream_names(
    data: Mapping[str, Any], tree: SettingNode
) -> tuple[dict[str, Any], SourceNames]:
    """A source's values, nested like the tree (the config file's tables, the environment as
    pydantic-settings reads it), without upstream's names: the ignored ones and the unknown ones
    it tolerates. Any other unknown name stays, for validation to refuse. Every name classified,
    dotted."""
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
                if not verdict.tolerated:
                    kept[key] = value
            elif isinstance(value, Mapping):
                kept[key] = walk(value, here)
            else:
                kept[key] = value
        return kept

    kept = walk(data, ())
    return kept, SourceNames((), tuple(ignored), tuple(unknown), tuple(tolerated))


def setting_env_name(loc: tuple[int | str, ...]) -> str:
    """The env var for a validation error location, e.g. SI_SDF__LAYER_DB_CONFIG__…."""
    return env_setting_name([part for part in loc if isinstance(part, str)])


def describe_validation_error(
    exc: ValidationError, name_of: Callable[[tuple[int | str, ...]], str]
) -> str:
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


def _read_environment(tree: SettingNode) -> dict[str, Any]:
    """The environment as pydantic-settings reads it; a section given as one variable that is
    not JSON is a ``SettingsError`` naming the variable (pydantic-settings' own error names only
    the field)."""
    try:
        return EnvSettingsSource(Settings)()
    except PydanticSettingsError:
        for name, value in sorted(os.environ.items()):
            if not name.upper().startswith(ENV_PREFIX):
                continue
            node: SettingNode | None = tree
            for part in env_setting_path(name):
                node = None if node is None else node.children.get(part)
            if node is None or not node.children:
                continue
            try:
                json.loads(value)
            except ValueError:
                raise SettingsError(
                    f"invalid {name}: a whole section in one variable must be a JSON object; "
                    f"or set its names one by one ({name}__<NAME>)"
                ) from None
        raise


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
        tables, from_file = prune_upstream_names(read_config_file(config_file), tree)
        from_file.raise_for_unknown(f" in config file {config_file}")
    from_env.warn_of_tolerated()
    from_file.warn_of_tolerated(f" (config file {config_file})")
    ignored = [*from_env.ignored, *from_file.ignored, *ignored_flags]
    if ignored:
        log.debug("ignored upstream sdf settings", names=ignored)
    flags = dict(overrides or {})
    # The env names were classified above as given (pydantic-settings never reads the ones that
    # name no field); its nested values lose upstream's names as the file's tables did.
    environment, _names = prune_upstream_names(_read_environment(tree), tree)
    sources = (
        InitSettingsSource(Settings, flags),
        InitSettingsSource(Settings, environment),
        InitSettingsSource(Settings, tables),
    )
    try:
        return Settings(_build_sources=(sources, flags))
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, setting_env_name)) from None
