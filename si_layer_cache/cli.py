"""The command line: flags (each with its env var and default), mode dispatch, exit statuses.

Exit statuses, decided here and only here:
  0   the mode finished (a backfill: every selected cache copied everything)
  1   the run failed part-way (a cache failed; the log names cache, key and cause)
  2   invalid input: a flag or setting is missing, unknown or malformed; nothing was opened
  3   the environment is not ready: cannot connect, bad credentials, missing table or bucket;
      run mode: the layer-db schema is not in place; runAndQuit: the database's migration
      history is not upstream's (an unknown or divergent migration, or tables it does not record)
      (the server: also when it cannot listen on --socket-addr)
  130 / 143  stopped by SIGINT / SIGTERM after draining; the log says how to resume (the server,
      run/skip, only ever stops this way: 143 after a clean SIGTERM shutdown, like the backfill)
Errors are one log line; ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import structlog
from rich.console import Console

from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CacheType
from layer_cache.errors import (
    BackfillConfigError,
    CacheTierUnavailable,
    LayerCacheError,
    ListenError,
    PreflightError,
    SchemaError,
    SettingsError,
    StorageError,
    WriteQueueUnavailable,
)
from layer_cache.schema import migrate_layer_db
from layer_cache.write_queue import (
    PG_RETRY_QUEUE,
    S3_WRITE_QUEUE,
    queue_status,
    replay_dead_letters,
)
from layer_cache_server.server import serve_layer_cache
from migrations_mode.config import (
    BACKFILL_ENV_PREFIX,
    BackfillConfig,
    BackfillSettings,
    VerifyMode,
    flag_for,
    load_backfill_config,
    repair_flags,
)
from migrations_mode.coordinator import BackfillReport, resolve_cutoff, run_backfill
from migrations_mode.dry_run import format_estimate_table, run_dry_run
from migrations_mode.preflight import explain_storage_error
from migrations_mode.summary import differences_found, format_summary_table
from services.context import open_services_context
from services.logging import LOG_FILE_NAME, configure_logging
from services.sdf_flags import add_sdf_flags, sdf_flag_settings
from services.setting_names import SettingUse, classify_setting, setting_tree
from services.settings import (
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    MigrationMode,
    Settings,
    load_settings,
)
from services.signals import StopRequest, capture_signals
from services.telemetry import package_version

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID_INPUT = 2
EXIT_ENVIRONMENT = 3

PROGRAM = "si-layer-cache"
LOG_FILE_DIRECTORY_ENV = "SI_LOG_FILE_DIRECTORY"
log = structlog.get_logger("services")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (JSON under ``--log-json`` or
    ``SI_LOG_JSON``, like every other error) and exits 2."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        text = f"{message} (see --help)"
        if self.json_errors:
            line = json.dumps({"event": text, "level": "error", "program": self.prog})
        else:
            line = f"{self.prog}: error: {text}"
        self.exit(EXIT_INVALID_INPUT, line + "\n")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_help(text: str, env: str, default: object = None) -> str:
    shown = "" if default is None else f"; default {default}"
    return f"{text} [env {env}{shown}]"


def _add_env_switch(group: Any, flag: str, env: str, text: str) -> None:
    """An on/off flag that the environment variable ``env`` can also turn on."""
    group.add_argument(
        flag, action="store_true", default=_env_flag(env), help=_env_help(text, env, "false")
    )


def _add_env_path(group: Any, flag: str, env: str, text: str) -> None:
    """A path option that defaults to the environment variable ``env``."""
    default = os.environ.get(env) or None
    group.add_argument(flag, type=Path, default=default, help=_env_help(text, env, "none"))


_BACKFILL_FLAGS: dict[str, str] = {
    "cutoff_timestamp": "copy rows with created_at strictly before this instant (RFC 3339, or a "
    "logged checkpoint such as '2026-01-13 17:30:26.445817 UTC'), or 'now': the database's "
    "clock at start, logged (saved progress is per cutoff: pass the logged instant to resume); "
    "required",
    "cache_types": "comma-separated cache types to copy, of: "
    + ", ".join(BACKFILLABLE_CACHE_TYPES)
    + " (no 'all', on purpose); required",
    "key_batch_size": "rows listed per Postgres query",
    "checkpoint_interval_secs": "seconds between 'backfill checkpoint' log events",
    "max_concurrent_uploads": "uploads in flight per cache type: the ceiling with tuned "
    "concurrency (default 64), the number with fixed (default 5)",
    "concurrency": "tuned (default): start at 5, rise while that brings more uploads a second, "
    "fall when latency rises or S3 throttles; fixed: the max in flight, halved while S3 "
    "throttles",
    "grace_period_secs": "seconds to let in-flight uploads finish after SIGTERM/SIGINT",
    "restart": "ignore saved progress and start from the cutoff",
    "progress_store": "where progress is saved: auto, postgres or s3",
    "retry_max_attempts": "attempts per storage call before the cache fails",
    "retry_max_secs": "seconds of retrying per storage call before the cache fails",
    "order": "walk order: key (linear on the upstream schema) or newest-first",
    "shard_index": "this process's shard, 0-based (default: JOB_COMPLETION_INDEX, else 0)",
    "shard_count": "number of shards the key space is split into",
    "max_inflight_bytes": "cap on value bytes held in memory at once per cache (64MiB, 1GiB, …)",
    "max_uploads_per_second": "cap on uploads (PUTs) a second for the whole process, shared "
    "by every cache type (a repair's too); verification PUTs nothing and is not limited "
    "(default: no limit)",
    "max_bytes_per_second": "cap on value bytes uploaded a second for the whole process, "
    "shared by every cache type (50MiB, 1GiB, …); verification is not limited (default: no "
    "limit)",
    "verify": "compare S3 with Postgres by size instead of copying; writes nothing (one "
    "LIST per 1,000 rows in key order)",
    "verify_content": "like --backfill-verify, but compare content: an object whose ETag is the "
    "row's MD5 is not read, any other is (every object under SSE-KMS or SSE-C)",
    "repair": "compare content as --backfill-verify-content does and re-upload every object "
    "that is missing or differs; never deletes; resumable (its own saved progress)",
    "verify_report": "write each difference found (verify or repair) as one JSON line to this file",
    "dry_run": "validate everything, count rows and bytes, estimate the run time; write nothing",
}


def build_parser() -> OneLineParser:
    """The CLI, grouped; every option shows its env var and default."""
    parser = OneLineParser(
        prog=PROGRAM,
        allow_abbrev=False,
        description="The SI layer cache service and its migration modes.",
        epilog="Settings also come from SI_SDF__… env vars (e.g. "
        "SI_SDF__LAYER_DB_CONFIG__PERSISTER_MODE) and a TOML config file; flags win over env, "
        "env over the file. Exit status: 0 done, 1 failed, 2 invalid input, 3 environment not "
        "ready, 130/143 interrupted.",
    )
    general = parser.add_argument_group("general")
    general.add_argument(
        "--migration-mode",
        choices=[mode.value for mode in MigrationMode],
        help=_env_help("what to do", f"{ENV_PREFIX}MIGRATION_MODE", MigrationMode.RUN.value),
    )
    _add_env_path(general, "--config", CONFIG_FILE_ENV, "TOML config file")
    _add_env_switch(general, "--log-json", "SI_LOG_JSON", "log JSON lines instead of console text")
    general.add_argument(
        "--metrics-port",
        type=int,
        help=_env_help(
            "serve Prometheus /metrics on this port (0 picks one)",
            f"{ENV_PREFIX}METRICS_PORT",
            "off",
        ),
    )
    _add_env_path(
        general,
        "--log-file-directory",
        LOG_FILE_DIRECTORY_ENV,
        f"also append JSON log lines to {LOG_FILE_NAME} there (rotated at 128 MiB)",
    )
    colours = general.add_mutually_exclusive_group()
    _add_env_switch(
        colours, "--no-color", "SI_NO_COLOR", "never colour console logs (also NO_COLOR)"
    )
    _add_env_switch(
        colours, "--force-color", "SI_FORCE_COLOR", "colour console logs even off a terminal"
    )
    general.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logs (-v debug, -vv libraries)"
    )
    general.add_argument(
        "-V", "--version", action="version", version=f"%(prog)s {package_version()}"
    )

    backfill = parser.add_argument_group("backfill (--migration-mode backfillLayerCache)")
    for field, text in _BACKFILL_FLAGS.items():
        default = BackfillSettings.model_fields[field].default
        switch = isinstance(default, bool)
        backfill.add_argument(
            "--backfill-" + field.replace("_", "-"),
            dest=f"backfill_{field}",
            **({"action": "store_const", "const": True} if switch else {"metavar": field.upper()}),
            help=_env_help(
                text,
                f"{BACKFILL_ENV_PREFIX}{field.upper()}",
                None if "required" in text else default,
            ),
        )

    server = parser.add_argument_group(
        "server (--migration-mode run or skip; other settings: "
        f"{ENV_PREFIX}SERVER__… env vars, see docs/server.md)"
    )
    server.add_argument(
        "--socket-addr",
        metavar="HOST:PORT",
        help=_env_help(
            "address the layer cache API listens on; port 0 picks a free port (logged)",
            f"{ENV_PREFIX}SOCKET_ADDR",
            Settings.model_fields["socket_addr"].default,
        ),
    )
    queue = server.add_mutually_exclusive_group()
    queue.add_argument(
        "--write-queue-status",
        action="store_true",
        help="print the S3 write queue's and the Postgres retry queue's entries and dead "
        "letters per cache type (JSON), then exit; opens only "
        f"{ENV_PREFIX}SERVER__WRITE_QUEUE_DIR",
    )
    queue.add_argument(
        "--write-queue-replay",
        metavar="CACHE_TYPE",
        help="move both queues' dead letters (all, or one cache type's) back into the queues, "
        f"then exit; opens only {ENV_PREFIX}SERVER__WRITE_QUEUE_DIR",
    )
    add_sdf_flags(parser)
    return parser


def backfill_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The backfill flags as given (None when absent, so env and defaults apply)."""
    return {field: getattr(args, f"backfill_{field}") for field in _BACKFILL_FLAGS}


async def _run_and_quit(settings: Settings, _args: argparse.Namespace) -> int:
    """Apply upstream's layer-db migrations the database lacks (none: no DDL), then exit."""
    async with open_services_context(settings, with_s3=False) as context:
        outcome = await migrate_layer_db(context.pg_pool)
    log.info(
        "layer-db schema up to date",
        dbname=settings.layer_db_config.pg_pool_config.dbname,
        applied=list(outcome.applied),
        already_applied=outcome.already_applied,
    )
    return EXIT_OK


async def _backfill(settings: Settings, args: argparse.Namespace) -> int:
    config = load_backfill_config(backfill_flags(args), settings.upstream_backfill_options())
    if not settings.layer_db_config.persister_mode.uses_s3:
        raise BackfillConfigError(
            "persister mode PostgresOnly has no S3 to fill; set "
            f"{ENV_PREFIX}LAYER_DB_CONFIG__PERSISTER_MODE to DualWrite, S3Primary or S3Only"
        )
    stop = StopRequest()
    with capture_signals(stop):
        connections = len(config.cache_types) * config.max_concurrent_uploads + 8
        async with open_services_context(
            settings, with_s3=True, s3_max_connections=connections
        ) as context:
            config = await resolve_cutoff(context, config)
            if config.dry_run:
                estimates = await run_dry_run(context, config)
                print(format_estimate_table(estimates, config), flush=True)
                return EXIT_OK
            live = not args.log_json and sys.stderr.isatty()
            console = Console(stderr=True) if live else None
            report = await run_backfill(context, config, stop, live_console=console)
    if not args.log_json:
        print(format_summary_table(report.outcomes, config.verify), flush=True)
    if report.failure is not None:
        failure = report.failure
        log.error(
            "backfill failed",
            failed_cache_type=failure.cache_type.value,
            key=failure.key,
            error_class=failure.cause.kind.value,
            error=str(failure.cause),
        )
        return EXIT_FAILED
    if stop.exit_status is not None:
        return stop.exit_status
    if not report.complete:
        return EXIT_FAILED
    if config.verify.compares:
        return _comparison_verdict(config, report)
    return EXIT_OK


def _comparison_verdict(config: BackfillConfig, report: BackfillReport) -> int:
    """The last line of a complete verification or repair (with the report's path), and its
    exit status: differences a verification found are a failure, naming the repair."""
    stats = [outcome.stats for outcome in report.outcomes]
    fields: dict[str, Any] = {
        "processed": sum(item.processed for item in stats),
        "missing": sum(item.missing for item in stats),
        "mismatched": sum(item.mismatched for item in stats),
        "report": None if config.verify_report is None else str(config.verify_report),
    }
    if config.verify is VerifyMode.REPAIR:
        log.info("repair finished", repaired=sum(item.repaired for item in stats), **fields)
        return EXIT_OK
    differences = differences_found(report.outcomes)
    if not differences:
        log.info("verification found no differences", **fields)
        return EXIT_OK
    repairable = [
        outcome.stats.cache_type
        for outcome in report.outcomes
        if outcome.stats.missing or outcome.stats.mismatched
    ]
    log.error(
        "verification found differences",
        differences=differences,
        extra=sum(item.extra for item in stats),
        **fields,
        repair_with=repair_flags(config, repairable) if repairable else None,
        note=None
        if not any(item.extra for item in stats)
        else "extra objects (no row) are not removed by a repair: review them in the report",
    )
    return EXIT_FAILED


async def _serve(settings: Settings, args: argparse.Namespace, *, check_schema_first: bool) -> int:
    """run (check the schema first, never change it) and skip (no check): serve the layer cache
    API until SIGTERM/SIGINT."""
    config = settings.server
    stop = StopRequest()
    with capture_signals(stop):
        try:
            await serve_layer_cache(settings, config, stop, check_schema_first=check_schema_first)
        except ListenError as exc:
            return _fail(str(exc), EXIT_ENVIRONMENT, exc, args.verbose)
    return stop.exit_status if stop.exit_status is not None else EXIT_OK


ModeHandler = Callable[[Settings, argparse.Namespace], Any]

MODE_HANDLERS: dict[MigrationMode, ModeHandler] = {
    MigrationMode.RUN_AND_QUIT: _run_and_quit,
    MigrationMode.BACKFILL_LAYER_CACHE: _backfill,
    MigrationMode.RUN: partial(_serve, check_schema_first=True),
    MigrationMode.SKIP: partial(_serve, check_schema_first=False),
}


def _write_queue_command(settings: Settings, args: argparse.Namespace) -> int:
    """``--write-queue-status`` / ``--write-queue-replay``: the queue directory, nothing else.
    A directory that does not exist holds no queue: that is a wrong setting, and nothing is
    created."""
    directory = settings.server.write_queue_dir
    if not directory.is_dir():
        flag = "--write-queue-status" if args.write_queue_status else "--write-queue-replay"
        raise SettingsError(
            f"{flag}: {ENV_PREFIX}SERVER__WRITE_QUEUE_DIR {directory} is not a directory, so it "
            "holds no write queue; point it at the server's queue volume"
        )
    # The S3 queue is always there (opening it creates an empty one); the Postgres retry queue
    # only once a server has needed it.
    kinds = [S3_WRITE_QUEUE] + [
        kind for kind in (PG_RETRY_QUEUE,) if (directory / kind.file_name).exists()
    ]
    if args.write_queue_status:
        now = time.time()
        print(
            json.dumps(
                {
                    kind.backend.value: {
                        cache_type.value: {
                            "queued": entry.queued,
                            "oldest_age_s": None
                            if entry.oldest_enqueued_at is None
                            else round(now - entry.oldest_enqueued_at, 3),
                            "dead_letters": entry.dead_letters,
                        }
                        for cache_type, entry in queue_status(directory, kind).items()
                    }
                    for kind in kinds
                }
            ),
            flush=True,
        )
        return EXIT_OK
    name = args.write_queue_replay
    served = [cache_type.value for cache_type in BACKFILLABLE_CACHE_TYPES]
    if name != "all" and name not in served:
        raise SettingsError(
            f"--write-queue-replay: unknown cache type {name!r}; use all or one of "
            + ", ".join(served)
        )
    cache_type = None if name == "all" else CacheType(name)
    replayed = sum(replay_dead_letters(directory, cache_type, kind) for kind in kinds)
    log.info("write queue dead letters replayed", count=replayed, cache_types=name)
    return EXIT_OK


def _fail(message: str, status: int, exc: BaseException, verbose: int) -> int:
    log.error(message, exc_info=exc if verbose else None)
    return status


def _colors(args: argparse.Namespace) -> bool | None:
    """Console colours: forced, refused (also by the standard NO_COLOR), or by the terminal."""
    if args.no_color and args.force_color:
        raise SettingsError("--no-color and --force-color (SI_NO_COLOR, SI_FORCE_COLOR) conflict")
    if args.force_color:
        return True
    if args.no_color or os.environ.get("NO_COLOR", ""):
        return False
    return None


def _backfill_flags_outside_backfill(args: argparse.Namespace, mode: MigrationMode) -> None:
    """Backfill flags mean nothing to another mode: refuse them rather than run that mode."""
    if mode is MigrationMode.BACKFILL_LAYER_CACHE:
        return
    given = [flag_for(field) for field, value in backfill_flags(args).items() if value is not None]
    if given:
        raise SettingsError(
            f"{given[0]} is a backfill option but the migration mode is {mode.value}; did you "
            "mean --migration-mode backfillLayerCache?"
        )


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """This program's own setting flags, as overrides of the tree's top level."""
    return {
        name: value
        for name, value in (
            ("migration_mode", args.migration_mode),
            ("metrics_port", args.metrics_port),
            ("socket_addr", args.socket_addr),
        )
        if value is not None
    }


def _load(args: argparse.Namespace) -> Settings:
    """The settings from flags (ours and sdf's), env and the config file."""
    tree = setting_tree(Settings)
    from_sdf = sdf_flag_settings(
        args, lambda path: classify_setting(tree, path).use is SettingUse.USED, os.environ
    )
    if from_sdf.refusal is not None:
        raise SettingsError(from_sdf.refusal)
    for warning in from_sdf.warnings:
        log.warning("sdf flag ignored", reason=warning)
    settings = load_settings(
        from_sdf.overrides | _flag_overrides(args),
        config_file=args.config,
        ignored_flags=from_sdf.ignored,
    )
    _backfill_flags_outside_backfill(args, settings.migration_mode)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    arguments = sys.argv[1:] if argv is None else list(argv)
    parser.json_errors = "--log-json" in arguments or _env_flag("SI_LOG_JSON")
    args = parser.parse_args(arguments)
    try:
        colors = _colors(args)
    except SettingsError as exc:
        parser.error(str(exc))
    configure_logging(
        json=args.log_json,
        verbosity=args.verbose,
        colors=colors,
        file_directory=args.log_file_directory,
    )
    try:
        settings = _load(args)
        if args.write_queue_status or args.write_queue_replay is not None:
            return _write_queue_command(settings, args)
        status: int = asyncio.run(MODE_HANDLERS[settings.migration_mode](settings, args))
    except (SettingsError, BackfillConfigError) as exc:
        return _fail(str(exc), EXIT_INVALID_INPUT, exc, args.verbose)
    except (PreflightError, SchemaError, WriteQueueUnavailable, CacheTierUnavailable) as exc:
        return _fail(str(exc), EXIT_ENVIRONMENT, exc, args.verbose)
    except StorageError as exc:
        return _fail(explain_storage_error(exc), EXIT_ENVIRONMENT, exc, args.verbose)
    except LayerCacheError as exc:
        return _fail(str(exc), EXIT_FAILED, exc, args.verbose)
    return status


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())
