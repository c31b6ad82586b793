"""The setting-name classifier: upstream sdf's names are used or ignored, typos are errors."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from layer_cache.errors import BackfillConfigError, SettingsError
from migrations_mode.config import load_backfill_config
from services.context import pg_pool_tuning
from services.setting_names import (
    UPSTREAM_SDF_SETTINGS,
    SettingUse,
    classify_setting,
    env_setting_name,
    env_setting_path,
    setting_tree,
)
from services.settings import (
    PgPoolConfig,
    PgSslMode,
    Settings,
    classify_environment,
    load_settings,
    prune_upstream_names,
)
from tests.support import CUTOFF_RFC3339, PG, STORAGE

CACHE = "SI_SDF__LAYER_DB_CONFIG__CACHE_CONFIG__"
TREE = setting_tree(Settings)


def verdict(name: str) -> SettingUse:
    return classify_setting(TREE, env_setting_path(name)).use


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SI_ variables from the outside world."""
    for name in list(os.environ):
        if name.startswith("SI_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(
    "name",
    [
        PG + "HOSTNAME",
        PG + "SSLMODE",  # ours, not upstream's
        PG + "CERTIFICATE__TYPE",
        PG + "CERTIFICATE__SOURCE",
        PG + "POOL_TIMEOUT_CREATE_SECS",
        PG + "POOL_IDLE_CONNECTION_LIFETIME_SECS",
        PG + "POOL_TOTAL_CONNECTION_LIFETIME_SECS",
        PG + "STATEMENT_CACHE_SIZE",
        STORAGE + "CA_BUNDLE",  # ours
        STORAGE + "AUTH",
        STORAGE + "AUTH__STATIC_CREDENTIALS__SECRET_KEY",
        "SI_SDF__BACKFILL_CUTOFF_TIMESTAMP",
        "SI_SDF__BACKFILL_MAX_CONCURRENT_UPLOADS",
        "SI_SDF__SERVER__GRACE_PERIOD_SECS",
        "si_sdf__migration_mode",  # case does not matter, as in pydantic-settings
        CACHE + "DISK_PATH",
        CACHE + "MEMORY_RESERVED_PERCENT",
        CACHE + "MEMORY_USABLE_MAX_PERCENT",
        CACHE + "DISK_LAYER",
        CACHE + "DISK_RESERVED_PERCENT",
        CACHE + "DISK_USABLE_MAX_PERCENT",
        CACHE + "DISK_ADMISSION_RATE_LIMIT",
        CACHE + "DISK_BUFFER_SIZE",
    ],
)
def test_names_read_here_are_used(name: str) -> None:
    assert verdict(name) is SettingUse.USED


@pytest.mark.parametrize(
    "name",
    [
        "SI_SDF__PG__HOSTNAME",
        "SI_SDF__PG__CERTIFICATE__SOURCE",
        "SI_SDF__NATS__URL",
        "SI_SDF__NATS__CREDS",
        "SI_SDF__INSTANCE_ID",
        "SI_SDF__BACKFILL_FUNC_RUNS_CUTOFF_ID",
        "SI_SDF__SYMMETRIC_CRYPTO_SERVICE__ACTIVE_KEY_BASE64",
        "SI_SDF__AUDIT__PG__PASSWORD",
        PG + "POOL_TIMEOUT_WAIT_SECS",
        PG + "POOL_TIMEOUT_RECYCLE_SECS",
        PG + "RECYCLING_METHOD",
        STORAGE + "READ_RETRY__MAX_ATTEMPTS",
        STORAGE + "NUM_WORKERS",
        STORAGE + "MAX_PARALLEL_PER_WORKER",
        "SI_SDF__LAYER_DB_CONFIG__NATS_CONFIG__URL",
        "SI_SDF__LAYER_DB_CONFIG__DISK_PATH",
        CACHE + "NAME",
        CACHE + "DISK_BUFFER_FLUSHERS",
        CACHE + "DISK_INDEXER_SHARDS",
        CACHE + "DISK_RECLAIMERS",
        CACHE + "DISK_RECOVER_CONCURRENCY",
    ],
)
def test_upstream_names_that_mean_nothing_here_are_ignored(name: str) -> None:
    assert verdict(name) is SettingUse.IGNORED


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        # misspellings of names read here, wherever they are
        (PG + "HOSTNAM", PG + "HOSTNAME"),
        ("SI_SDF__MIGRATON_MODE", "SI_SDF__MIGRATION_MODE"),
        (STORAGE + "BUCKET_PREFX", STORAGE + "BUCKET_PREFIX"),
        ("SI_SDF__BACKFILL_CUTOF_TIMESTAMP", "SI_SDF__BACKFILL_CUTOFF_TIMESTAMP"),
        (PG + "CERTIFICATE__SORCE", PG + "CERTIFICATE__SOURCE"),
        # any unknown name in a section that is ours alone
        ("SI_SDF__SERVER__GRACE_PERIOD_SEC", "SI_SDF__SERVER__GRACE_PERIOD_SECS"),
        ("SI_SDF__SERVER__PLAINLY_WRONG", None),
    ],
)
def test_unknown_names_are_errors_with_the_closest_known_name(
    name: str, suggestion: str | None
) -> None:
    names = classify_environment({name: "x"}, TREE)
    assert names.unknown == ((name, suggestion),)
    with pytest.raises(SettingsError, match="unknown setting") as raised:
        names.raise_for_unknown()
    assert (f"did you mean {suggestion}?" in str(raised.value)) is (suggestion is not None)


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        # a real upstream field in some releases, unknown to both registries
        (STORAGE + "RATE_LIMIT__REQUESTS_PER_SECOND", None),
        (PG + "PLAINLY_WRONG", None),
        ("SI_SDF__SOME_FUTURE_SECTION__X", None),
        # close only to names upstream defines and this program ignores: no misspelling of ours
        ("SI_SDF__NATZ__URL", "SI_SDF__NATS__URL"),
        (STORAGE + "READ_RETRIES", STORAGE + "READ_RETRY"),
    ],
)
def test_unknown_names_in_upstreams_sections_are_one_warning_each_and_the_run_goes_on(
    name: str, closest: str | None
) -> None:
    names = classify_environment({name: "x"}, TREE)
    assert names.unknown == ()
    assert names.tolerated == ((name, closest),)

    with capture_logs() as logs:
        names.raise_for_unknown()
        names.warn_of_tolerated()

    [warning] = logs
    assert (warning["event"], warning["log_level"]) == ("unknown setting ignored", "warning")
    assert (warning["name"], warning["closest_known"]) == (name, closest)


def test_an_unknown_upstream_name_loads_the_settings_with_one_warning(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv(STORAGE + "RATE_LIMIT__REQUESTS_PER_SECOND", "50")
    clean_env.setenv(PG + "HOSTNAME", "layer-db")

    with capture_logs() as logs:
        settings = load_settings()

    assert settings.layer_db_config.pg_pool_config.hostname == "layer-db"
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == [
        "unknown setting ignored"
    ]


def test_every_used_upstream_name_is_a_field_and_no_ignored_one_is() -> None:
    fields_only = setting_tree(Settings, upstream=())
    for setting in UPSTREAM_SDF_SETTINGS:
        use = classify_setting(fields_only, setting.path.split(".")).use
        expected = SettingUse.USED if setting.use is SettingUse.USED else SettingUse.UNKNOWN
        assert use is expected, setting.path


def test_config_file_drops_upstream_tables_and_rejects_typos() -> None:
    data = {
        "pg": {"hostname": "main-db", "certificate": {"type": "path", "source": "/x"}},
        "nats": {"url": "nats://nats:4222"},
        "layer_db_config": {
            "persister_mode": "DualWrite",
            "pg_pool_config": {"hostname": "layer-db", "recycling_method": "Fast"},
            "object_storage_config": {"read_retry": {"max_attempts": 3}, "num_workers": 10},
        },
    }
    kept, names = prune_upstream_names(data, TREE)
    assert kept == {
        "layer_db_config": {
            "persister_mode": "DualWrite",
            "pg_pool_config": {"hostname": "layer-db"},
            "object_storage_config": {},
        }
    }
    assert set(names.ignored) == {
        "pg",
        "nats",
        "layer_db_config.pg_pool_config.recycling_method",
        "layer_db_config.object_storage_config.read_retry",
        "layer_db_config.object_storage_config.num_workers",
    }
    _, typo = prune_upstream_names({"layer_db_config": {"pg_pool_config": {"hostnam": "x"}}}, TREE)
    assert typo.unknown == (
        (
            "layer_db_config.pg_pool_config.hostnam",
            "layer_db_config.pg_pool_config.hostname",
        ),
    )


def test_ignored_settings_are_named_once_at_debug_without_values(
    clean_env: pytest.MonkeyPatch,
) -> None:
    secret = "nkey-SUAEXAMPLESECRETVALUE"
    clean_env.setenv("SI_SDF__NATS__CREDS", secret)
    clean_env.setenv("SI_SDF__SYMMETRIC_CRYPTO_SERVICE__ACTIVE_KEY_BASE64", secret)
    clean_env.setenv(PG + "HOSTNAME", "layer-db")
    with capture_logs() as logs:
        settings = load_settings()
    assert settings.layer_db_config.pg_pool_config.hostname == "layer-db"
    [event] = [log for log in logs if log["event"] == "ignored upstream sdf settings"]
    assert event["log_level"] == "debug"
    assert event["names"] == [
        "SI_SDF__NATS__CREDS",
        "SI_SDF__SYMMETRIC_CRYPTO_SERVICE__ACTIVE_KEY_BASE64",
    ]
    assert secret not in repr(logs)


def test_config_file_with_upstream_sections_loads(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "sdf.toml"
    config.write_text(
        f'backfill_cutoff_timestamp = "{CUTOFF_RFC3339}"\n'
        '[pg]\nhostname = "main-db"\n[nats]\nurl = "nats://nats:4222"\n'
        '[layer_db_config.pg_pool_config]\nhostname = "layer-db"\npool_timeout_wait_secs = 5\n'
        "[layer_db_config.object_storage_config.read_retry]\nmax_attempts = 3\n"
    )
    settings = load_settings(config_file=config)
    assert settings.layer_db_config.pg_pool_config.hostname == "layer-db"
    assert settings.upstream_backfill_options() == {"cutoff_timestamp": CUTOFF_RFC3339}
    config.write_text('[layer_db_config.pg_pool_config]\nhostnam = "x"\n')
    with pytest.raises(SettingsError) as raised:
        load_settings(config_file=config)
    assert "did you mean layer_db_config.pg_pool_config.hostname?" in str(raised.value)


def test_upstream_certificate_path_is_our_ca_and_verifies_the_server(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv(PG + "CERTIFICATE__TYPE", "path")
    clean_env.setenv(PG + "CERTIFICATE__SOURCE", "/etc/ssl/certs/rds-global-bundle.pem")
    pool = load_settings().layer_db_config.pg_pool_config
    assert pool.ssl_ca_cert == Path("/etc/ssl/certs/rds-global-bundle.pem")
    assert pool.sslmode is PgSslMode.VERIFY_FULL
    assert pool.ssl_ca_data is None
    clean_env.setenv(PG + "SSLMODE", "require")  # ours, given explicitly, wins
    assert load_settings().layer_db_config.pg_pool_config.sslmode is PgSslMode.REQUIRE


def test_upstream_certificate_inline_sources(clean_env: pytest.MonkeyPatch) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    # base64 of a PEM file (a Kubernetes Secret's ca.pem): the PEM text, as upstream reads it
    clean_env.setenv(PG + "CERTIFICATE__TYPE", "base64")
    clean_env.setenv(PG + "CERTIFICATE__SOURCE", base64.b64encode(pem.encode()).decode())
    assert load_settings().layer_db_config.pg_pool_config.ssl_ca_data == pem
    # base64 of DER: the DER bytes
    clean_env.setenv(PG + "CERTIFICATE__SOURCE", base64.b64encode(b"0\x82\x01\x0a").decode())
    assert load_settings().layer_db_config.pg_pool_config.ssl_ca_data == b"0\x82\x01\x0a"
    clean_env.setenv(PG + "CERTIFICATE__TYPE", "as_string")
    clean_env.setenv(PG + "CERTIFICATE__SOURCE", pem)
    assert load_settings().layer_db_config.pg_pool_config.ssl_ca_data == pem


def test_upstream_remote_certificate_is_a_url_fetched_later(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv(PG + "CERTIFICATE__TYPE", "remote")
    clean_env.setenv(PG + "CERTIFICATE__SOURCE", "https://truststore.example/ca.pem")
    pool = load_settings().layer_db_config.pg_pool_config
    assert pool.sslmode is PgSslMode.VERIFY_FULL
    assert (pool.ssl_ca_cert, pool.ssl_ca_data) == (None, None)


@pytest.mark.parametrize(
    ("kind", "source", "message"),
    [
        ("remote", "/etc/ssl/ca.pem", "must be an http:// or https:// URL for type remote"),
        ("remote", "ftp://truststore.example/ca.pem", "must be an http:// or https:// URL"),
        ("base64", "not base64!", "source is not valid base64"),
        ("base64", base64.b64encode(b"hello").decode(), "holds no PEM, base64 DER or DER"),
        ("as_string", "hello", "source \\(as_string\\) holds no PEM, base64 DER or DER"),
        ("pem", "/x", "invalid SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__CERTIFICATE__TYPE"),
    ],
)
def test_unusable_certificate_is_one_line_naming_the_setting(
    clean_env: pytest.MonkeyPatch, kind: str, source: str, message: str
) -> None:
    clean_env.setenv(PG + "CERTIFICATE__TYPE", kind)
    clean_env.setenv(PG + "CERTIFICATE__SOURCE", source)
    with pytest.raises(SettingsError, match=message) as raised:
        load_settings()
    assert "CERTIFICATE" in str(raised.value)


def test_pool_timeouts_and_lifetimes_map_to_ours(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(PG + "POOL_TIMEOUT_CREATE_SECS", "4")
    clean_env.setenv(PG + "POOL_IDLE_CONNECTION_LIFETIME_SECS", "21600")
    pool = load_settings().layer_db_config.pg_pool_config
    assert pool.connect_timeout_secs == 4
    assert pool.pool_idle_connection_lifetime_secs == 21600
    clean_env.setenv(PG + "CONNECT_TIMEOUT_SECS", "7")  # ours wins
    assert load_settings().layer_db_config.pg_pool_config.connect_timeout_secs == 7


def test_total_connection_lifetime_is_upstreams_20_hours_unless_set(
    clean_env: pytest.MonkeyPatch,
) -> None:
    assert load_settings().layer_db_config.pg_pool_config.pool_total_connection_lifetime_secs == (
        20 * 3600
    )
    clean_env.setenv(PG + "POOL_TOTAL_CONNECTION_LIFETIME_SECS", "3600")
    pool = load_settings().layer_db_config.pg_pool_config
    assert pool.pool_total_connection_lifetime_secs == 3600
    clean_env.setenv(PG + "POOL_TOTAL_CONNECTION_LIFETIME_SECS", "0")
    with pytest.raises(SettingsError, match="POOL_TOTAL_CONNECTION_LIFETIME_SECS"):
        load_settings()


def test_empty_values_are_unset_as_upstream(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(STORAGE + "BUCKET_SUFFIX", "")
    assert load_settings().layer_db_config.object_storage_config.bucket_suffix is None


def test_upstream_backfill_names_sit_below_flags_and_si_backfill(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("SI_SDF__BACKFILL_CUTOFF_TIMESTAMP", CUTOFF_RFC3339)
    clean_env.setenv("SI_SDF__BACKFILL_CACHE_TYPES", "cas")
    clean_env.setenv("SI_SDF__BACKFILL_KEY_BATCH_SIZE", "250")
    clean_env.setenv("SI_SDF__BACKFILL_FUNC_RUNS_CUTOFF_ID", "01JFUNCRUN")
    clean_env.setenv("SI_BACKFILL_FUNC_RUN_LOGS_CUTOFF_ID", "01JFUNCRUNLOG")  # upstream's, ignored
    upstream = load_settings().upstream_backfill_options()
    config = load_backfill_config({}, upstream)
    assert (config.cutoff.isoformat(), config.cache_types, config.key_batch_size) == (
        "2026-01-13T17:30:26.445817+00:00",
        ("cas",),
        250,
    )
    clean_env.setenv("SI_BACKFILL_KEY_BATCH_SIZE", "500")
    assert load_backfill_config({}, upstream).key_batch_size == 500
    assert load_backfill_config({"key_batch_size": "9"}, upstream).key_batch_size == 9


def test_invalid_upstream_backfill_value_names_both_variables(
    clean_env: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(BackfillConfigError) as raised:
        load_backfill_config({"cache_types": "cas"}, {"cutoff_timestamp": "yesterday"})
    assert "SI_BACKFILL_CUTOFF_TIMESTAMP or SI_SDF__BACKFILL_CUTOFF_TIMESTAMP" in str(raised.value)


def test_backfill_typo_suggests_the_option(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SI_BACKFILL_KEY_BACH_SIZE", "5")
    with pytest.raises(BackfillConfigError, match="did you mean SI_BACKFILL_KEY_BATCH_SIZE"):
        load_backfill_config({"cutoff_timestamp": CUTOFF_RFC3339, "cache_types": "cas"})


def test_docs_list_every_upstream_setting_as_the_registry_does() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "upstream-settings.md").read_text()
    used, ignored = docs.split("## Accepted and ignored")
    for setting in UPSTREAM_SDF_SETTINGS:
        name = env_setting_name(setting.path.split(".")) + ("__…" if setting.section else "")
        section = used if setting.use is SettingUse.USED else ignored
        assert f"| `{name}` | {setting.note} |" in section, name


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, {"statement_cache_size": 100}),
        ({"statement_cache_size": 0}, {"statement_cache_size": 0}),
        (
            {"pool_idle_connection_lifetime_secs": 21600},
            {"statement_cache_size": 100, "max_inactive_connection_lifetime": 21600},
        ),
    ],
)
def test_pool_tuning_from_settings(settings: dict[str, int], expected: dict[str, int]) -> None:
    assert pg_pool_tuning(PgPoolConfig.model_validate(settings)) == expected
