"""Upstream sdf's command-line flags (``bin/sdf/src/args.rs``), accepted as sdf's Job passes them.

sdf's Kubernetes Job passes flags as well as its environment (``--pg-hostname``, ``--nats-url``,
``--no-color``, …). Every flag sdf defines is in ``SDF_FLAGS`` with the settings upstream's
``build_config_map`` writes from it. ``sdf_flag_settings`` (pure) sends a given flag's value to
each of those settings this program reads, as a flag override (so ``--pg-hostname`` sets
``layer_db_config.pg_pool_config.hostname``, as in sdf, and wins over the environment); the
settings it only names for sdf (``pg.hostname``, ``nats.url``, …) and flags that write nothing
here are named, never with their values, in the one debug line of ignored settings. The tree in
``services.setting_names`` decides which is which, exactly as for environment names. Flags that make
sdf do something else entirely (generate keys instead of running) are refused with one line.
The flags sdf reads from the environment too (``SI_MODULE_INDEX_URL``, …) are named the same way
when set. ``--no-color``, ``--force-color``, ``--log-file-directory``, ``--log-json``, ``-v``,
``--migration-mode`` and the five backfill flags are this program's own flags with sdf's names.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

_PG = "pg."
_LAYER_PG = "layer_db_config.pg_pool_config."
_LAYER_NATS = "layer_db_config.nats_config."


class FlagKind(Enum):
    """How a flag takes its value, as clap parses it."""

    VALUE = auto()  # --flag VALUE
    SWITCH = auto()  # --flag (a bool with default false)
    LIST = auto()  # --flag A,B (repeatable, comma-delimited)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {text!r}")
    return port


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, got {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class SdfFlag:
    """One flag of sdf's command line."""

    name: str
    writes: tuple[str, ...] = ()  # dotted settings build_config_map sets from it
    kind: FlagKind = FlagKind.VALUE
    env: str | None = None  # clap's environment twin
    value_type: Callable[[str], Any] = str
    refusal: str | None = None  # why this program will not do what the flag asks
    warning: str | None = None  # said once when given: what the flag does not do
    help: str | None = None  # shown in --help (the flags that mean something here)

    @property
    def dest(self) -> str:
        """The argparse destination."""
        return "sdf_" + self.name.removeprefix("--").replace("-", "_")


def _both(setting: str) -> tuple[str, ...]:
    """sdf sets its main pool's and the layer db pool's setting from one flag."""
    return (_PG + setting, _LAYER_PG + setting)


_KEY_GENERATION = (
    "makes sdf generate a key file instead of running; this program generates no keys: run sdf "
    "for that"
)

# sdf writes pg_pool_config.certificate_path / certificate_base64, which its PgPoolConfig does not
# read (its field is ``certificate``): the flag verifies nothing there, nor here.
_CERT_FLAG = (
    "is ignored, as by sdf (its pool config reads certificate, not what the flag writes); to "
    "verify the server set SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__CERTIFICATE__TYPE and "
    "__SOURCE"
)

SDF_FLAGS: tuple[SdfFlag, ...] = (
    SdfFlag("--pg-dbname", (_PG + "dbname",)),
    SdfFlag(
        "--layer-db-pg-dbname",
        (_LAYER_PG + "dbname",),
        help="layer-db database name (sdf's flag; sets …PG_POOL_CONFIG__DBNAME)",
    ),
    SdfFlag(
        "--pg-hostname",
        _both("hostname"),
        help="Postgres host (sdf's flag; sets …PG_POOL_CONFIG__HOSTNAME)",
    ),
    SdfFlag(
        "--pg-pool-max-size",
        _both("pool_max_size"),
        value_type=_count,
        help="connection pool size (sdf's flag; sets …PG_POOL_CONFIG__POOL_MAX_SIZE)",
    ),
    SdfFlag(
        "--pg-port",
        _both("port"),
        value_type=_port,
        help="Postgres port (sdf's flag; sets …PG_POOL_CONFIG__PORT)",
    ),
    SdfFlag(
        "--pg-user", _both("user"), help="Postgres role (sdf's flag; sets …PG_POOL_CONFIG__USER)"
    ),
    SdfFlag("--pg-cert-path", _both("certificate_path"), warning=_CERT_FLAG),
    SdfFlag("--pg-cert-base64", _both("certificate_base64"), warning=_CERT_FLAG),
    SdfFlag("--pg-recycling-method", _both("recycling_method")),
    SdfFlag("--nats-url", ("nats.url", _LAYER_NATS + "url")),
    SdfFlag("--nats-creds", ("nats.creds", _LAYER_NATS + "creds")),
    SdfFlag("--nats-creds-path", ("nats.creds_file", _LAYER_NATS + "creds_file")),
    SdfFlag("--veritech-encryption-key-path", ("crypto.encryption_key_file",)),
    SdfFlag("--veritech-encryption-key-base64", ("crypto.encryption_key_base64",)),
    SdfFlag(
        "--symmetric-crypto-active-key-base64", ("symmetric_crypto_service.active_key_base64",)
    ),
    SdfFlag("--jwt-public-signing-key-base64", ("jwt_signing_public_key.key_base64",)),
    SdfFlag("--jwt-public-signing-key-algo", ("jwt_signing_public_key.algo",)),
    SdfFlag(
        "--jwt-secondary-public-signing-key-base64",
        ("jwt_secondary_signing_public_key.key_base64",),
    ),
    SdfFlag("--jwt-secondary-public-signing-key-algo", ("jwt_secondary_signing_public_key.algo",)),
    SdfFlag("--layer-db-disk-path", ("layer_db_config.disk_path",)),
    SdfFlag("--layer-db-seconds-to-idle"),  # defined by sdf, written nowhere by build_config_map
    SdfFlag("--tokio-console", kind=FlagKind.SWITCH, env="SI_TOKIO_CONSOLE"),
    SdfFlag("--module-index-url", ("module_index_url",), env="SI_MODULE_INDEX_URL"),
    SdfFlag("--features", ("boot_feature_flags",), kind=FlagKind.LIST, env="SI_FEATURES"),
    SdfFlag(
        "--create-workspace-permissions",
        ("create_workspace_permissions",),
        env="SI_CREATE_WORKSPACE_PERMISSIONS",
    ),
    SdfFlag(
        "--create-workspace-allowlist",
        ("create_workspace_allowlist",),
        kind=FlagKind.LIST,
        env="SI_CREATE_WORKSPACE_ALLOWLIST",
    ),
    SdfFlag("--auth-api-url", ("auth_api_url",), env="SI_AUTH_API_URL"),
    SdfFlag("--openai-api-key", ("openai.api_key",), env="SI_OPENAI_API_KEY"),
    SdfFlag("--openai-api-base", ("openai.api_base",), env="SI_OPENAI_API_BASE"),
    SdfFlag("--openai-org-id", ("openai.org_id",), env="SI_OPENAI_ORG_ID"),
    SdfFlag("--openai-project-id", ("openai.project_id",), env="SI_OPENAI_PROJECT_ID"),
    SdfFlag(
        "--asset-sprayer-prompts-dir",
        ("asset_sprayer.prompts_dir",),
        env="SI_ASSET_SPRAYER_PROMPTS_DIR",
    ),
    SdfFlag("--instance-id", ("instance_id",)),
    SdfFlag(
        "--backfill-func-runs-cutoff-id",
        ("backfill_func_runs_cutoff_id",),
        env="SI_BACKFILL_FUNC_RUNS_CUTOFF_ID",
    ),
    SdfFlag(
        "--backfill-func-run-logs-cutoff-id",
        ("backfill_func_run_logs_cutoff_id",),
        env="SI_BACKFILL_FUNC_RUN_LOGS_CUTOFF_ID",
    ),
    SdfFlag("--generate-veritech-secret-key-path", refusal=_KEY_GENERATION),
    SdfFlag("--generate-veritech-public-key-path", refusal=_KEY_GENERATION),
    SdfFlag("--generate-symmetric-key-path", refusal=_KEY_GENERATION),
)


def add_sdf_flags(parser: argparse.ArgumentParser) -> None:
    """Add sdf's flags: those that set something here with help, the rest hidden."""
    group = parser.add_argument_group(
        "sdf's flags (accepted as sdf's Job passes them; the others, --nats-url and so on, are "
        "accepted and ignored: docs/upstream-settings.md)"
    )
    for flag in SDF_FLAGS:
        shown = flag.help if flag.help is not None else argparse.SUPPRESS
        if flag.kind is FlagKind.SWITCH:
            group.add_argument(flag.name, dest=flag.dest, action="store_true", help=shown)
        elif flag.kind is FlagKind.LIST:
            group.add_argument(flag.name, dest=flag.dest, action="append", help=shown)
        else:
            metavar = flag.name.removeprefix("--").split("-")[-1].upper()
            group.add_argument(
                flag.name, dest=flag.dest, type=flag.value_type, metavar=metavar, help=shown
            )


@dataclass(frozen=True, slots=True)
class SdfFlagSettings:
    """What sdf's flags on a command line come to: setting overrides and names to report."""

    overrides: dict[str, Any]  # nested, as the settings tree
    ignored: tuple[str, ...]  # flag names (and set env twins) that mean nothing here
    warnings: tuple[str, ...] = ()  # flags that look as if they did more than they do
    refusal: str | None = None  # one line, when a flag asks for something else entirely


def given_flags(args: argparse.Namespace) -> list[SdfFlag]:
    """The sdf flags present on the command line."""
    return [flag for flag in SDF_FLAGS if getattr(args, flag.dest, None) not in (None, False)]


def _set_nested(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, name = dotted.split(".")
    for section in sections:
        tree = tree.setdefault(section, {})
    tree[name] = value


def sdf_flag_settings(
    args: argparse.Namespace,
    is_used: Callable[[Sequence[str]], bool],
    environ: Mapping[str, str],
) -> SdfFlagSettings:
    """The overrides and ignored names from sdf's flags; ``is_used`` says whether this program
    reads a setting path. A refused flag comes back as ``refusal`` (nothing else matters then)."""
    overrides: dict[str, Any] = {}
    ignored: list[str] = []
    warnings: list[str] = []
    for flag in given_flags(args):
        if flag.refusal is not None:
            return SdfFlagSettings({}, (), (), f"{flag.name} {flag.refusal}")
        used = [path for path in flag.writes if is_used(path.split("."))]
        for path in used:
            _set_nested(overrides, path, getattr(args, flag.dest))
        if not used:
            ignored.append(flag.name)
        if flag.warning is not None:
            warnings.append(f"{flag.name} {flag.warning}")
    ignored.extend(
        flag.env for flag in SDF_FLAGS if flag.env is not None and environ.get(flag.env, "").strip()
    )
    return SdfFlagSettings(overrides, tuple(ignored), tuple(warnings))
