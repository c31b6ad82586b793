"""Loading the settings: sources built per call, upstream's names pruned from every source."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import EnvSettingsSource

from layer_cache.errors import BackfillConfigError, SettingsError
from migrations_mode.config import load_backfill_config
from services.setting_names import setting_tree
from services.settings import Settings, load_settings, prune_upstream_names

PG_POOL = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG"
CUTOFF = "2026-01-13T17:30:26.445817Z"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SI_ variables from the outside world."""
    for name in list(os.environ):
        if name.startswith("SI_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def in_step(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[str], Any]], list[Any]]:
    """Runs a load in two threads, each stopping when it has set up its environment source
    until the other has too: the moment a hand-off through shared state would give one load
    the other's flags, file or upstream options."""

    def run(load: Callable[[str], Any]) -> list[Any]:
        barrier = threading.Barrier(2, timeout=10)
        set_up = EnvSettingsSource.__init__

        def set_up_and_wait(source: EnvSettingsSource, *args: Any, **kwargs: Any) -> None:
            set_up(source, *args, **kwargs)
            barrier.wait()

        monkeypatch.setattr(EnvSettingsSource, "__init__", set_up_and_wait)

        def outcome(name: str) -> Any:
            try:
                return load(name)
            except (SettingsError, BackfillConfigError) as exc:
                return str(exc)

        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(outcome, ["first", "second"]))

    return run


def test_two_loads_at_once_each_get_their_own_flags_and_config_file(
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    in_step: Callable[[Callable[[str], Any]], list[Any]],
) -> None:
    def load(name: str) -> tuple[str, str]:
        config = tmp_path / f"{name}.toml"
        config.write_text(f'[layer_db_config.pg_pool_config]\nhostname = "{name}-db"\n')
        settings = load_settings({"socket_addr": f"{name}:5156"}, config_file=config)
        return settings.layer_db_config.pg_pool_config.hostname, settings.socket_addr

    assert in_step(load) == [("first-db", "first:5156"), ("second-db", "second:5156")]


def test_two_backfill_loads_at_once_each_get_their_own_upstream_options(
    clean_env: pytest.MonkeyPatch, in_step: Callable[[Callable[[str], Any]], list[Any]]
) -> None:
    def load(name: str) -> int | str:
        if name == "first":  # everything from upstream's names
            upstream = {"cutoff_timestamp": CUTOFF, "cache_types": "cas", "key_batch_size": 250}
            return load_backfill_config({}, upstream).key_batch_size
        # a bad flag, nothing from upstream: the error names only this program's variable
        load_backfill_config({"cutoff_timestamp": "yesterday", "cache_types": "cas"})
        return "loaded"

    first, second = in_step(load)
    assert first == 250
    assert isinstance(second, str)
    assert "(SI_BACKFILL_CUTOFF_TIMESTAMP)" in second


def test_upstream_names_inside_a_json_section_value_are_dropped_as_in_the_config_file(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv(PG_POOL, '{"hostname": "layer-db", "recycling_method": "Fast"}')
    assert load_settings().layer_db_config.pg_pool_config.hostname == "layer-db"


def test_a_typo_inside_a_json_section_value_is_still_refused(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv(PG_POOL, '{"hostnam": "layer-db"}')
    with pytest.raises(SettingsError, match=f"^unknown setting {PG_POOL}__HOSTNAM$"):
        load_settings()


@pytest.mark.parametrize("value", ["notjson", "{", '["a", '])
def test_a_section_value_that_is_not_json_is_one_line_naming_the_variable(
    clean_env: pytest.MonkeyPatch, value: str
) -> None:
    clean_env.setenv(PG_POOL, value)
    with pytest.raises(SettingsError, match=f"^invalid {PG_POOL}: a whole section in one"):
        load_settings()


def test_pruning_drops_upstreams_names_and_keeps_unknown_ones_for_validation() -> None:
    data = {
        "pg": {"hostname": "main-db"},
        "layer_db_config": {
            "pg_pool_config": {"hostname": "layer-db", "hostnam": "x", "recycling_method": "F"},
            "object_storage_config": {"rate_limit": {"requests_per_second": 50}},
        },
    }
    kept, names = prune_upstream_names(data, setting_tree(Settings))
    assert kept == {
        "layer_db_config": {
            "pg_pool_config": {"hostname": "layer-db", "hostnam": "x"},
            "object_storage_config": {},
        }
    }
    assert names.ignored == ("pg", "layer_db_config.pg_pool_config.recycling_method")
    assert [name for name, _ in names.unknown] == ["layer_db_config.pg_pool_config.hostnam"]
    assert [name for name, _ in names.tolerated] == [
        "layer_db_config.object_storage_config.rate_limit"
    ]
