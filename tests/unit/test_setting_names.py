"""The name registry's pure parts: the tree, verdicts and suggestions, env names, the flat check."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.setting_names import (
    UPSTREAM_SDF_SETTINGS,
    SettingUse,
    UpstreamSetting,
    classify_setting,
    env_setting_name,
    env_setting_path,
    setting_tree,
    unknown_env_var,
)
from services.settings import Settings


def test_the_registry_names_each_setting_once() -> None:
    paths = [setting.path for setting in UPSTREAM_SDF_SETTINGS]
    assert len(paths) == len(set(paths))


def test_an_ignored_section_covers_every_name_below_it_and_a_plain_name_does_not() -> None:
    tree = setting_tree(
        Settings,
        upstream=(
            UpstreamSetting("legacy", SettingUse.IGNORED, "a whole section", section=True),
            UpstreamSetting("old_name", SettingUse.IGNORED, "one name"),
        ),
    )
    assert classify_setting(tree, ("legacy",)).use is SettingUse.IGNORED
    assert classify_setting(tree, ("legacy", "any", "depth")).use is SettingUse.IGNORED
    assert classify_setting(tree, ("old_name",)).use is SettingUse.IGNORED
    # a plain name has nothing below it, and is no section upstream's loader owns
    below = classify_setting(tree, ("old_name", "part"))
    assert (below.use, below.tolerated) == (SettingUse.UNKNOWN, False)


def test_a_misspelling_of_a_name_read_here_is_suggested_first_and_never_tolerated() -> None:
    tree = setting_tree(
        Settings,
        upstream=(UpstreamSetting("socket_adr", SettingUse.IGNORED, "close to ours"),),
    )
    verdict = classify_setting(tree, ("socket_ad",))
    assert verdict.use is SettingUse.UNKNOWN
    assert verdict.suggestion == ("socket_addr",)
    assert not verdict.tolerated


def test_a_name_close_only_to_an_ignored_one_is_tolerated_with_that_suggestion() -> None:
    tree = setting_tree(Settings)
    verdict = classify_setting(tree, ("natz", "url"))
    assert (verdict.use, verdict.suggestion, verdict.tolerated) == (
        SettingUse.UNKNOWN,
        ("nats", "url"),
        True,
    )


_PART = st.from_regex(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", fullmatch=True)


@given(path=st.lists(_PART, min_size=1, max_size=5).map(tuple))
def test_env_names_and_tree_paths_convert_both_ways(path: tuple[str, ...]) -> None:
    assert env_setting_path(env_setting_name(path)) == path
    assert env_setting_path(env_setting_name(path, "APP__"), "APP__") == path


def test_env_setting_name_and_path_examples() -> None:
    assert env_setting_name(("layer_db_config", "pg_pool_config", "hostname")) == (
        "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__HOSTNAME"
    )
    assert env_setting_path("si_sdf__Migration_Mode") == ("migration_mode",)


@pytest.mark.parametrize(
    ("environ", "nested", "expected"),
    [
        ({"APP_KEY_BATCH_SIZE": "1", "OTHER": "x"}, False, None),
        ({"app_key_batch_size": "1"}, False, None),  # names are case-insensitive
        ({"APP_OLD_CUTOFF_ID": "x"}, False, None),  # an ignored name
        (
            {"APP_KEY_BACH_SIZE": "1"},
            False,
            "unknown setting APP_KEY_BACH_SIZE; did you mean APP_KEY_BATCH_SIZE?",
        ),
        ({"APP_PLAINLY_WRONG": "1"}, False, "unknown setting APP_PLAINLY_WRONG"),
        # nested: only the first level is a field; what is below it is the field's business
        ({"APP_KEY_BATCH_SIZE__ANYTHING": "1"}, True, None),
        (
            {"APP_KEY_BATCH_SIZ__X": "1", "APP_ZZZ": "1"},  # the first in sorted order
            True,
            "unknown setting APP_KEY_BATCH_SIZ__X; did you mean APP_KEY_BATCH_SIZE?",
        ),
    ],
)
def test_unknown_env_var_names_the_first_unknown_name_with_a_suggestion(
    environ: dict[str, str], nested: bool, expected: str | None
) -> None:
    found = unknown_env_var(
        environ, "APP_", ("key_batch_size", "cutoff"), nested=nested, ignored=("old_cutoff_id",)
    )
    assert found == expected
