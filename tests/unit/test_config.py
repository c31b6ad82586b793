from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from layer_cache.cache_types import CacheType
from layer_cache.concurrency import ConcurrencyMode
from layer_cache.errors import BackfillConfigError
from migrations_mode.config import (
    format_checkpoint,
    load_backfill_config,
    parse_cache_types,
    parse_cutoff,
    with_resolved_cutoff,
)

CUTOFF = "2026-01-13T17:30:26.445817Z"


@pytest.fixture(autouse=True)
def _no_backfill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "SI_BACKFILL_CUTOFF_TIMESTAMP",
        "SI_BACKFILL_CACHE_TYPES",
        "SI_BACKFILL_KEY_BATCH_SIZE",
        "SI_BACKFILL_MAX_CONCURRENT_UPLOADS",
        "SI_BACKFILL_MAX_UPLOADS_PER_SECOND",
        "SI_BACKFILL_MAX_BYTES_PER_SECOND",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CUTOFF, datetime(2026, 1, 13, 17, 30, 26, 445817, tzinfo=UTC)),
        ("2026-01-13 17:30:26.445817 UTC", datetime(2026, 1, 13, 17, 30, 26, 445817, tzinfo=UTC)),
        ("2026-01-13T19:30:26+02:00", datetime(2026, 1, 13, 17, 30, 26, tzinfo=UTC)),
        ("2026-01-13t17:30:26.5z", datetime(2026, 1, 13, 17, 30, 26, 500000, tzinfo=UTC)),
        ("2026-01-13T17:30:26.123456789Z", datetime(2026, 1, 13, 17, 30, 26, 123456, tzinfo=UTC)),
        ("2026-01-13T12:30:26-0500", datetime(2026, 1, 13, 17, 30, 26, tzinfo=UTC)),
    ],
)
def test_cutoff_accepts_rfc3339_and_the_logged_form(text: str, expected: datetime) -> None:
    assert parse_cutoff(text) == expected


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2026-01-13", "2026-01-13T17:30:26", "2026-02-30T00:00:00Z"]
)
def test_cutoff_without_zone_or_invalid_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        parse_cutoff(text)


def test_logged_checkpoint_reads_back_exactly() -> None:
    instant = datetime(2026, 1, 13, 17, 30, 26, 445817, tzinfo=UTC)
    assert format_checkpoint(instant) == "2026-01-13 17:30:26.445817 UTC"
    assert parse_cutoff(format_checkpoint(instant)) == instant


def test_cache_types_are_trimmed_and_deduplicated() -> None:
    assert parse_cache_types(" cas, workspace_snapshot,,cas ") == {
        CacheType.CAS,
        CacheType.WORKSPACE_SNAPSHOT,
    }


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({}, "--backfill-cutoff-timestamp (SI_BACKFILL_CUTOFF_TIMESTAMP) is required"),
        (
            {"cutoff_timestamp": CUTOFF},
            "--backfill-cache-types (SI_BACKFILL_CACHE_TYPES) is required",
        ),
        ({"cutoff_timestamp": "soon", "cache_types": "cas"}, "invalid --backfill-cutoff-timestamp"),
        ({"cutoff_timestamp": CUTOFF, "cache_types": " , "}, "must name at least one of: cas"),
        ({"cutoff_timestamp": CUTOFF, "cache_types": "cas,nope"}, "unknown cache type 'nope'"),
        ({"cutoff_timestamp": CUTOFF, "cache_types": "func_run"}, "'func_run' is not backfillable"),
        ({"cutoff_timestamp": CUTOFF, "cache_types": "all"}, "unknown cache type 'all'"),
        (
            {"cutoff_timestamp": CUTOFF, "cache_types": "cas", "key_batch_size": "0"},
            "invalid --backfill-key-batch-size (SI_BACKFILL_KEY_BATCH_SIZE)",
        ),
        (
            {"cutoff_timestamp": CUTOFF, "cache_types": "cas", "max_concurrent_uploads": "0"},
            "invalid --backfill-max-concurrent-uploads (SI_BACKFILL_MAX_CONCURRENT_UPLOADS)",
        ),
        (
            {"cutoff_timestamp": CUTOFF, "cache_types": "cas", "key_batch_size": "ten"},
            "invalid --backfill-key-batch-size",
        ),
    ],
)
def test_invalid_backfill_options_name_the_flag(flags: dict[str, str], message: str) -> None:
    with pytest.raises(BackfillConfigError) as caught:
        load_backfill_config(flags)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_flags_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SI_BACKFILL_CUTOFF_TIMESTAMP", CUTOFF)
    monkeypatch.setenv("SI_BACKFILL_CACHE_TYPES", "cas")
    monkeypatch.setenv("SI_BACKFILL_KEY_BATCH_SIZE", "50")
    config = load_backfill_config({"key_batch_size": "7", "max_concurrent_uploads": None})
    assert config.key_batch_size == 7
    assert config.max_concurrent_uploads == 64  # the tuned default's ceiling
    assert config.cache_types == (CacheType.CAS,)
    assert config.checkpoint_interval == timedelta(seconds=30)


@pytest.mark.parametrize(
    ("flags", "concurrency", "max_concurrent"),
    [
        ({}, ConcurrencyMode.TUNED, 64),
        ({"concurrency": "fixed"}, ConcurrencyMode.FIXED, 5),
        ({"concurrency": "tuned", "max_concurrent_uploads": "200"}, ConcurrencyMode.TUNED, 200),
        ({"concurrency": "fixed", "max_concurrent_uploads": "20"}, ConcurrencyMode.FIXED, 20),
    ],
)
def test_concurrency_mode_and_its_default_maximum(
    flags: dict[str, str], concurrency: ConcurrencyMode, max_concurrent: int
) -> None:
    config = load_backfill_config({"cutoff_timestamp": CUTOFF, "cache_types": "cas", **flags})
    assert (config.concurrency, config.max_concurrent_uploads) == (concurrency, max_concurrent)


def test_concurrency_mode_comes_from_env_and_bad_values_name_the_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SI_BACKFILL_CONCURRENCY", "tuned")
    config = load_backfill_config({"cutoff_timestamp": CUTOFF, "cache_types": "cas"})
    assert config.concurrency is ConcurrencyMode.TUNED
    with pytest.raises(BackfillConfigError) as caught:
        load_backfill_config(
            {"cutoff_timestamp": CUTOFF, "cache_types": "cas", "concurrency": "gradient"}
        )
    assert "invalid --backfill-concurrency (SI_BACKFILL_CONCURRENCY)" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# --backfill-max-uploads-per-second, --backfill-max-bytes-per-second


def test_rate_limits_are_off_unless_given() -> None:
    config = load_backfill_config({"cutoff_timestamp": CUTOFF, "cache_types": "cas"})
    assert (config.max_uploads_per_second, config.max_bytes_per_second) == (None, None)


@pytest.mark.parametrize(
    ("uploads", "byte_size", "expected"),
    [
        ("250", "50MiB", (250.0, 50 * 1024**2)),
        ("0.5", "1048576", (0.5, 1024**2)),
        ("1e3", "100MB", (1000.0, 100_000_000)),
    ],
)
def test_rate_limits_take_a_rate_and_a_byte_size_from_flags_or_env(
    uploads: str, byte_size: str, expected: tuple[float, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {"cutoff_timestamp": CUTOFF, "cache_types": "cas"}
    by_flags = load_backfill_config(
        base | {"max_uploads_per_second": uploads, "max_bytes_per_second": byte_size}
    )
    monkeypatch.setenv("SI_BACKFILL_MAX_UPLOADS_PER_SECOND", uploads)
    monkeypatch.setenv("SI_BACKFILL_MAX_BYTES_PER_SECOND", byte_size)
    by_env = load_backfill_config(base)
    flag_wins = load_backfill_config(base | {"max_uploads_per_second": "7"})

    for config in (by_flags, by_env):
        assert (config.max_uploads_per_second, config.max_bytes_per_second) == expected
    assert flag_wins.max_uploads_per_second == 7.0
    assert flag_wins.max_bytes_per_second == expected[1]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_uploads_per_second", "0", "greater than 0"),
        ("max_uploads_per_second", "-5", "greater than 0"),
        ("max_uploads_per_second", "inf", "finite"),
        ("max_uploads_per_second", "nan", "finite"),
        ("max_uploads_per_second", "fast", "valid number"),
        ("max_bytes_per_second", "0", "greater than 0"),
        ("max_bytes_per_second", "0MiB", "greater than 0"),
        ("max_bytes_per_second", "50 MiBs", "not a byte size"),
        ("max_bytes_per_second", "1.5B", "whole number of bytes"),
    ],
)
def test_a_bad_rate_limit_is_one_line_naming_the_flag_and_env_var(
    field: str, value: str, message: str
) -> None:
    flags = {"cutoff_timestamp": CUTOFF, "cache_types": "cas", field: value}
    with pytest.raises(BackfillConfigError) as caught:
        load_backfill_config(flags)
    text = str(caught.value)
    flag = "--backfill-" + field.replace("_", "-")
    assert f"invalid {flag} (SI_BACKFILL_{field.upper()})" in text
    assert message in text
    assert "\n" not in text


def test_cache_types_run_in_registry_order_once() -> None:
    config = load_backfill_config(
        {"cutoff_timestamp": CUTOFF, "cache_types": "workspace_snapshot,cas,workspace_snapshot"}
    )
    assert config.cache_types == (CacheType.CAS, CacheType.WORKSPACE_SNAPSHOT)


# ---------------------------------------------------------------------------------------------
# --backfill-cutoff-timestamp now


@pytest.mark.parametrize("text", ["now", "NOW", " Now "])
def test_now_cutoff_is_marked_and_provisionally_the_local_utc_clock(text: str) -> None:
    before = datetime.now(UTC)
    config = load_backfill_config({"cutoff_timestamp": text, "cache_types": "cas"})
    assert config.cutoff_is_now
    assert config.cutoff.tzinfo is not None
    assert before <= config.cutoff <= datetime.now(UTC)


def test_now_is_accepted_from_si_backfill_and_sdfs_upstream_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SI_BACKFILL_CUTOFF_TIMESTAMP", "now")
    assert load_backfill_config({"cache_types": "cas"}).cutoff_is_now
    monkeypatch.delenv("SI_BACKFILL_CUTOFF_TIMESTAMP")
    upstream = {"cutoff_timestamp": "now"}  # SI_SDF__BACKFILL_CUTOFF_TIMESTAMP, via Settings
    assert load_backfill_config({"cache_types": "cas"}, upstream).cutoff_is_now
    # A fixed instant anywhere above wins, as for any option.
    fixed = load_backfill_config({"cutoff_timestamp": CUTOFF, "cache_types": "cas"}, upstream)
    assert not fixed.cutoff_is_now
    assert fixed.cutoff == parse_cutoff(CUTOFF)


@pytest.mark.parametrize("text", ["now()", "nowish", "today", "now UTC"])
def test_other_words_are_still_refused_naming_the_flag(text: str) -> None:
    with pytest.raises(BackfillConfigError, match="invalid --backfill-cutoff-timestamp"):
        load_backfill_config({"cutoff_timestamp": text, "cache_types": "cas"})


def test_resolving_now_takes_the_database_clock_in_utc() -> None:
    config = load_backfill_config({"cutoff_timestamp": "now", "cache_types": "cas"})
    database_now = datetime(2026, 12, 1, 6, 45, 1, 123456, tzinfo=timezone(timedelta(hours=1)))
    resolved = with_resolved_cutoff(config, database_now)
    assert not resolved.cutoff_is_now
    assert resolved.cutoff == database_now
    assert resolved.cutoff.tzinfo is UTC
    assert format_checkpoint(resolved.cutoff) == "2026-12-01 05:45:01.123456 UTC"
    assert replace(resolved, cutoff=config.cutoff, cutoff_is_now=True) == config  # nothing else


def test_resolving_leaves_a_fixed_cutoff_alone_and_refuses_a_naive_clock() -> None:
    fixed = load_backfill_config({"cutoff_timestamp": CUTOFF, "cache_types": "cas"})
    assert with_resolved_cutoff(fixed, datetime.now(UTC)) is fixed
    pending = load_backfill_config({"cutoff_timestamp": "now", "cache_types": "cas"})
    with pytest.raises(ValueError, match="aware"):
        with_resolved_cutoff(pending, datetime(2026, 12, 1, 5, 45))
