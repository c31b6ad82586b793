"""``make demo``'s account of what it seeded (why 449 of cas's 500 rows are copied), the lines
``make demo-up`` prints to reach its servers, and ``make help``."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from devenv.demo import NO_COLLECTOR, export_block, seed_report
from devenv.seed import Seeded, seed
from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CacheType
from tests.support import REPO_ROOT

CUTOFF = datetime(2026, 1, 13, 17, 30, 26, tzinfo=UTC)


class RecordingPool:
    """Takes ``seed``'s inserts (its only use of the pool) and keeps the rows."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, datetime, bytes]] = []

    async def executemany(self, _statement: str, rows: Sequence[Any]) -> None:
        self.rows.extend(rows)


async def test_seed_counts_the_rows_it_put_at_or_after_the_cutoff() -> None:
    for cache_type in BACKFILLABLE_CACHE_TYPES:
        pool = RecordingPool()

        seeded = await seed(pool, cache_type, 500, cutoff=CUTOFF)  # type: ignore[arg-type]

        after = sum(created_at >= CUTOFF for _key, created_at, _value in pool.rows)
        assert seeded == Seeded(rows=len(pool.rows), at_or_after_cutoff=after)
        assert 0 < after < 500
    cas_pool = RecordingPool()
    cas = await seed(cas_pool, CacheType.CAS, 500, cutoff=CUTOFF)  # type: ignore[arg-type]
    assert (cas.below_cutoff, cas.at_or_after_cutoff) == (449, 51)  # the demo's cas


def test_the_demo_says_how_many_seeded_rows_it_does_not_copy_and_why() -> None:
    seeded = {
        CacheType.CAS: Seeded(500, 51),
        CacheType.SPLIT_SNAPSHOT_REBASE_BATCH: Seeded(500, 41),
    }

    report = seed_report(seeded, CUTOFF)

    lines = report.splitlines()
    assert "2026-01-13 17:30:26.000000 UTC" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split()}
    assert rows["cas"] == ["500", "51", "449"]
    assert rows["split_snapshot_rebase_batch"] == ["500", "41", "459"]
    assert rows["total"] == ["1,000", "92", "908"]
    assert "copies the rows created before the cutoff" in report
    assert max(len(line) for line in lines) <= 100


def test_demo_up_prints_every_variable_as_an_export_line_and_a_command_to_try() -> None:
    env = {
        "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__PASSWORD": "a secret with spaces",
        "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__AUTH__STATIC_CREDENTIALS__SECRET_KEY": (
            "bugbear-dev-secret"
        ),
    } | NO_COLLECTOR

    block = export_block(env, CUTOFF)

    script = "\n".join(line for line in block.splitlines() if line.startswith("export "))
    shown = subprocess.run(
        ["bash", "-c", script + "\nenv -0"], capture_output=True, check=True, text=True
    ).stdout.split("\0")
    for name, value in env.items():
        assert f"{name}={value}" in shown
    assert "--backfill-cutoff-timestamp '2026-01-13 17:30:26.000000 UTC'" in block


def phony_targets() -> list[str]:
    makefile = (REPO_ROOT / "Makefile").read_text()
    found = re.search(r"^\.PHONY:(.*)$", makefile, re.MULTILINE)
    assert found is not None
    return found.group(1).split()


def test_make_help_lists_every_target_with_one_line_each() -> None:
    result = subprocess.run(
        ["make", "--no-print-directory", "help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    described = {}
    for line in result.stdout.splitlines():
        target, _, text = line.strip().partition(" ")
        described[target] = text.strip()
    assert sorted(described) == sorted(phony_targets())
    assert all(described.values()), described
    assert "KEEP=1" in described["demo"]
    assert "Ctrl-C" in described["demo-up"]
