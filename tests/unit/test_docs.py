"""The documentation against the code: every relative link resolves, every default it quotes is
the code's.

The pages are the README, ``docs/``, ``deploy/README.md`` and ``grafana/README.md``. A link's
file must exist, and its ``#anchor`` must be a heading of that file (GitHub's slugs). A default is
checked wherever a table gives one beside a flag or variable this program reads: the backfill's
flag table (``docs/backfill.md``) against ``BackfillSettings``, the settings tables of
``docs/server.md`` against the settings tree. The README's Kubernetes commands are
``deploy/README.md``'s own, so the two never drift apart.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from migrations_mode.config import DEFAULT_MAX_CONCURRENT_UPLOADS, BackfillSettings
from migrations_mode.log_fields import FIELDS
from services.settings import ENV_PREFIX, Settings
from tests.support import REPO_ROOT

PAGES = sorted(
    [
        REPO_ROOT / "README.md",
        *(REPO_ROOT / "docs").glob("*.md"),
        REPO_ROOT / "deploy" / "README.md",
        REPO_ROOT / "grafana" / "README.md",
    ]
)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*$", re.M)


def prose(page: Path) -> str:
    """The page without its fenced code blocks (a link there is code, not a link)."""
    return _FENCE.sub("", page.read_text(encoding="utf-8"))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, markup and punctuation dropped (but ``-``
    and ``_``), spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).lower()
    kept = "".join(
        char for char in text if char in " -_" or unicodedata.category(char)[0] in ("L", "N")
    )
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, with GitHub's ``-1``, ``-2`` … for repeated ones."""
    seen: dict[str, int] = {}
    found = set()
    for _level, heading in _HEADING.findall(prose(page)):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        found.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return found


def relative_links(page: Path) -> Iterator[tuple[str, Path, str]]:
    """(link as written, target file, anchor or '') for every relative link of the page."""
    for target in _LINK.findall(prose(page)):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        yield target, (page.parent / path).resolve() if path else page, anchor


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page: Path) -> None:
    broken = []
    for link, target, anchor in relative_links(page):
        if not target.exists():
            broken.append(f"{link}: no {target.relative_to(REPO_ROOT)}")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.relative_to(REPO_ROOT)}")
    assert broken == []


def test_the_slugs_are_githubs() -> None:
    assert github_slug("Verify, then repair") == "verify-then-repair"
    assert github_slug("`python -m bench` (`make bench`)") == "python--m-bench-make-bench"
    assert github_slug("Cut-over to S3Only") == "cut-over-to-s3only"


# --------------------------------------------------------------------------------------------
# Defaults


def table_rows(page: Path) -> Iterator[tuple[list[str], list[str]]]:
    """(the table's header cells, the row's cells) for every body row of every table."""
    header: list[str] | None = None
    for line in prose(page).splitlines():
        if not (line.startswith("|") and line.endswith("|")):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            yield header, cells


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def renderings(value: Any) -> set[str]:
    """How a default may be written in a table cell."""
    if value is PydanticUndefined:
        return {"required"}
    if value is None:
        return {"required", "none", "no limit", "off", "unset"}
    if isinstance(value, bool):
        return {"on", "true"} if value else {"off", "false"}
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        mib = value // (1024 * 1024)
        return {str(value), f"{mib} MiB", f"{mib}MiB", f"`{value}`"}
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(getattr(value, "value", value))
    return {text, f"`{text}`"}


def quoted_default_matches(cell: str, value: Any) -> bool:
    return any(rendering in cell for rendering in renderings(value))


BACKFILL_TABLE = REPO_ROOT / "docs" / "backfill.md"


def backfill_flag_defaults() -> Iterator[tuple[str, str, Any]]:
    """(flag, default cell, the code's default) for every flag of the backfill's table."""
    fields = BackfillSettings.model_fields
    for header, cells in table_rows(BACKFILL_TABLE):
        if "default" not in header:
            continue
        flags = [span.split()[0] for span in code_spans(cells[0]) if span.startswith("--backfill-")]
        defaults = [part.strip() for part in cells[1].split(",")]
        for position, flag in enumerate(flags):
            field = flag.removeprefix("--backfill-").replace("-", "_")
            assert field in fields, f"{flag} is in the table but is not a backfill option"
            cell = defaults[position] if len(defaults) == len(flags) else cells[1]
            yield flag, cell, fields[field].default


def test_the_backfill_flag_table_quotes_every_default_as_the_code_has_it() -> None:
    checked = []
    for flag, cell, default in backfill_flag_defaults():
        if flag == "--backfill-max-concurrent-uploads":  # None: by concurrency mode
            for mode, value in DEFAULT_MAX_CONCURRENT_UPLOADS.items():
                assert f"{value} {mode.value}" in cell, (flag, cell)
        elif flag == "--backfill-shard-index":  # None: the Job's completion index, else 0
            assert "JOB_COMPLETION_INDEX" in cell, (flag, cell)
        else:
            assert quoted_default_matches(cell, default), (flag, cell, default)
        checked.append(flag)
    documented = {flag.removeprefix("--backfill-").replace("-", "_") for flag in checked}
    assert documented == set(BackfillSettings.model_fields), "flags missing from the table"


def settings_default(env_name: str) -> Any:
    """The default of the setting an ``SI_SDF__…`` name denotes."""
    model: type[BaseModel] = Settings
    parts = env_name.removeprefix(ENV_PREFIX).lower().split("__")
    for part in parts[:-1]:
        annotation = model.model_fields[part].annotation
        assert isinstance(annotation, type), env_name
        assert issubclass(annotation, BaseModel), env_name
        model = annotation
    return model.model_fields[parts[-1]].get_default(call_default_factory=True)


def test_the_servers_settings_tables_quote_the_codes_defaults() -> None:
    checked = 0
    for header, cells in table_rows(REPO_ROOT / "docs" / "server.md"):
        names = code_spans(cells[0])
        if "default" not in header or not names or not names[0].startswith(ENV_PREFIX):
            continue
        name = names[0]
        if "…" in name or cells[0].count("`") > 2:
            continue  # a family of names, described not defaulted
        default_cell = cells[header.index("default")]
        default = settings_default(name)
        assert quoted_default_matches(default_cell, default), (name, default_cell, default)
        checked += 1
    assert checked >= 10


def test_the_readmes_kubernetes_commands_are_the_deploy_guides() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    guide = (REPO_ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    commands = [
        line.strip()
        for line in readme.splitlines()
        if line.strip().startswith(("kubectl ", "make manifests", "docker build"))
    ]
    assert commands, "the README's Kubernetes quick start has no commands"
    verbs = {command.split()[1] for command in commands if command.startswith("kubectl ")}
    for verb in verbs:
        assert f"kubectl {verb} " in guide, f"the README says kubectl {verb}, the guide does not"


def test_every_log_field_of_the_backfill_is_in_the_observability_page() -> None:
    page = (REPO_ROOT / "docs" / "observability.md").read_text(encoding="utf-8")
    quoted = set(re.findall(r"`([a-z0-9_]+)`", page))
    assert sorted(set(FIELDS) - quoted) == []
