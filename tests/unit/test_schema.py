"""The pure parts of the layer-db schema: SipHash-1-3, refinery's checksum and row format, which
migrations refinery would apply or refuse, the shipped files, and the run-mode gap report.

Where the expected values come from (none is computed by the code under test):

* SipHash-1-3 vectors: the published 64-bit SipHash-1-3 test vectors (key 00..0f, message
  00..n-1) that the Rust project and the ``siphasher`` crate test against.
* CPython's own ``hash()`` of bytes is SipHash-1-3 since 3.11; with ``PYTHONHASHSEED=0`` its key
  is all zeros, which is refinery's key. A second, independent implementation (C).
* ``REFINERY_CHECKSUMS``: printed by this Rust program (rustc 1.95, std only, run on the shipped
  files). std's ``DefaultHasher::new()`` is SipHasher13 with zero keys, which refinery 0.8 used
  before switching to ``siphasher``'s identical ``SipHasher13::new()`` for stability::

      let (head, name) = stem.split_once("__").unwrap();
      let version: i32 = head[1..].parse().unwrap();
      let mut hasher = DefaultHasher::new();
      name.to_string().hash(&mut hasher);  // refinery: name.hash; version.hash; sql.hash
      version.hash(&mut hasher);
      sql.as_str().hash(&mut hasher);
      println!("{} {} {}", version, name, hasher.finish());

* ``UPSTREAM_BLOBS``: ``git ls-tree`` of systeminit/si at 8efe79651 (2026-01-27),
  ``lib/si-layer-cache/src/migrations``: the git blob ids of upstream's files.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest

from layer_cache.errors import SchemaError
from layer_cache.schema import (
    CREATE_HISTORY_TABLE,
    HistoryRow,
    Migration,
    pending_migrations,
    refinery_checksum,
    refinery_timestamp,
    schema_gaps,
    shipped_migrations,
)
from layer_cache.siphash import siphash13

REFERENCE_KEY = (0x0706050403020100, 0x0F0E0D0C0B0A0908)
SIPHASH13_VECTORS = {  # message length → the vector's 8 output bytes (little-endian)
    0: "dcc40f055801acab",
    1: "93ca577df39bf4c9",
    2: "4dd4c74d029bcb82",
    7: "4011b19b987d92d3",
    8: "8e9a298d11959036",
    15: "5699512a6dd820d3",
    16: "668b907d1add4fcc",
    63: "a8b3bbb76290199d",
}

REFINERY_CHECKSUMS = {
    (1, "cas"): 7018471698921779387,
    (2, "workspace_snapshots"): 7926154486272052929,
    (3, "encrypted_secrets"): 12126752398000865744,
    (4, "func_executions"): 9539212872284050928,
    (5, "func_runs"): 6452040153669902399,
    (6, "func_run_logs"): 2502736940200221735,
    (7, "func_runs_extra_indexes"): 6359159869771307311,
    (8, "rebase_batches"): 22365621104096494,
    (9, "change_batches"): 6529316008607404904,
    (10, "split_snapshots"): 15653158764649736747,
}

UPSTREAM_BLOBS = {
    "U0001__cas.sql": "74fd95b7a4a884f19635e058a50af07f9426997a",
    "U0002__workspace_snapshots.sql": "58911f55a86deb2270dde7651eb8b5801e0ce4d1",
    "U0003__encrypted_secrets.sql": "18b54cff67c50fa739872ba37f311bd65c60140e",
    "U0004__func_executions.sql": "7bb2ed7eefa294d00f2fa11f3b7132f5c9fecb1e",
    "U0005__func_runs.sql": "55eae94bc14d805a56d1c1cc5ca1a2b980c6d24d",
    "U0006__func_run_logs.sql": "a0e66f0675c1ef86d6a7546d0196d5c43b101537",
    "U0007__func_runs_extra_indexes.sql": "db3493ed9ecd4fe5a9e8a9bf0d53ccb6ab77b1ea",
    "U0008__rebase_batches.sql": "34295e7e936a3a3c0acc8fa0b8e1cbe0942392ef",
    "U0009__change_batches.sql": "8e16c2213e115eb4ec7b21e6ac970faca6f24002",
    "U0010__split_snapshots.sql": "e55d77be868dcf379e2d7f8b7cf8f910c2713303",
}

APPLIED_ON = "2026-01-27T19:00:00.123456789Z"  # as refinery writes it (nanoseconds)


def history_of(*versions: int) -> list[HistoryRow]:
    """History rows exactly as refinery records the shipped migrations of ``versions``."""
    name_of = {migration.version: migration.name for migration in shipped_migrations()}
    return [
        HistoryRow(v, name_of[v], APPLIED_ON, str(REFINERY_CHECKSUMS[v, name_of[v]]))
        for v in versions
    ]


# --------------------------------------------------------------------------------------------
# SipHash-1-3 and refinery's checksum


@pytest.mark.parametrize(("length", "expected"), sorted(SIPHASH13_VECTORS.items()))
def test_siphash13_matches_the_published_vectors(length: int, expected: str) -> None:
    message = bytes(range(length))

    assert siphash13(message, *REFERENCE_KEY) == int.from_bytes(bytes.fromhex(expected), "little")


def test_siphash13_with_zero_keys_agrees_with_cpython_hash_of_bytes() -> None:
    assert sys.hash_info.algorithm == "siphash13"
    rng = random.Random(61)
    messages = [rng.randbytes(length) for length in (1, 3, 7, 8, 9, 16, 31, 64, 200, 1500)]
    program = (
        "import sys; data = [bytes.fromhex(line) for line in sys.stdin.read().split()];"
        "print(' '.join(str(hash(d)) for d in data))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        input=" ".join(message.hex() for message in messages),
        env={"PYTHONHASHSEED": "0"},  # CPython's SipHash key is then all zeros
        capture_output=True,
        text=True,
        check=True,
    )
    cpython = [int(value) for value in result.stdout.split()]

    ours = []
    for message in messages:
        unsigned = siphash13(message)
        signed = unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned
        ours.append(-2 if signed == -1 else signed)  # CPython never returns -1 from hash()
    assert ours == cpython


def test_refinery_checksum_of_each_shipped_migration_is_what_rust_computes() -> None:
    computed = {
        (migration.version, migration.name): migration.checksum
        for migration in shipped_migrations()
    }

    assert computed == REFINERY_CHECKSUMS


def test_refinery_checksum_covers_name_version_and_every_byte_of_the_sql() -> None:
    base = refinery_checksum("cas", 1, "x")

    assert base == 3930879496908165949  # the same Rust program, on ("cas", 1, "x")
    assert refinery_checksum("cas", 2, "x") != base
    assert refinery_checksum("cat", 1, "x") != base
    assert refinery_checksum("cas", 1, "x\n") != base


# --------------------------------------------------------------------------------------------
# The shipped files


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content, usedforsecurity=False).hexdigest()


def test_shipped_migrations_are_upstreams_files_byte_for_byte() -> None:
    shipped = {m.file_name: git_blob_id(m.sql.encode()) for m in shipped_migrations()}

    assert shipped == UPSTREAM_BLOBS


def test_shipped_migrations_are_numbered_one_to_ten_in_order() -> None:
    assert [migration.version for migration in shipped_migrations()] == list(range(1, 11))


def test_created_tables_are_read_from_each_migration() -> None:
    by_name = {migration.name: migration for migration in shipped_migrations()}

    assert by_name["split_snapshots"].created_tables() == [
        "split_snapshot_supergraphs",
        "split_snapshot_subgraphs",
        "split_snapshot_rebase_batches",
    ]
    assert by_name["func_executions"].created_tables() == [
        "func_executions",
        "func_execution_messages",
    ]
    assert by_name["func_runs_extra_indexes"].created_tables() == []


def test_history_table_ddl_is_refinerys() -> None:
    assert CREATE_HISTORY_TABLE == (
        "CREATE TABLE IF NOT EXISTS refinery_schema_history(\n"
        "             version INT4 PRIMARY KEY,\n"
        "             name VARCHAR(255),\n"
        "             applied_on VARCHAR(255),\n"
        "             checksum VARCHAR(255));"
    )


# --------------------------------------------------------------------------------------------
# refinery's applied_on


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 1, 27, 19, 0, 5, 123450, tzinfo=UTC), "2026-01-27T19:00:05.12345Z"),
        (datetime(2026, 1, 27, 19, 0, 5, 500000, tzinfo=UTC), "2026-01-27T19:00:05.5Z"),
        (datetime(2026, 1, 27, 19, 0, 5, tzinfo=UTC), "2026-01-27T19:00:05Z"),
        (
            datetime(2026, 1, 27, 21, 0, 5, 1, tzinfo=timezone(timedelta(hours=2))),
            "2026-01-27T19:00:05.000001Z",
        ),
    ],
)
def test_refinery_timestamp_is_the_time_crates_rfc3339(moment: datetime, expected: str) -> None:
    assert refinery_timestamp(moment) == expected


# --------------------------------------------------------------------------------------------
# Which migrations refinery would apply, or refuse


def names(migrations: list[Migration]) -> list[str]:
    return [migration.file_name for migration in migrations]


def test_an_empty_history_applies_every_migration_in_order() -> None:
    pending = pending_migrations(shipped_migrations(), [])

    assert names(pending) == sorted(UPSTREAM_BLOBS)


def test_a_complete_history_applies_nothing() -> None:
    assert pending_migrations(shipped_migrations(), history_of(*range(1, 11))) == []


def test_a_partial_history_applies_the_rest() -> None:
    pending = pending_migrations(shipped_migrations(), history_of(1, 2, 3, 4, 5, 6))

    assert names(pending) == sorted(UPSTREAM_BLOBS)[6:]


def test_a_gap_below_the_newest_applied_unversioned_migration_is_filled() -> None:
    # U migrations are "unversioned" in refinery: a missing one below the newest is applied.
    history = [row for row in history_of(*range(1, 11)) if row.version != 7]

    pending = pending_migrations(shipped_migrations(), history)

    assert names(pending) == ["U0007__func_runs_extra_indexes.sql"]


@pytest.mark.parametrize(
    ("history", "message"),
    [
        (
            [*history_of(1, 2), HistoryRow(3, "encrypted_secrets", APPLIED_ON, "1")],
            "records migration 3 (encrypted_secrets) with checksum 1, which diverges from the "
            "shipped U0003__encrypted_secrets.sql (checksum 12126752398000865744)",
        ),
        (
            [HistoryRow(1, "content_addressed", APPLIED_ON, str(REFINERY_CHECKSUMS[1, "cas"]))],
            "records migration 1 (content_addressed) with checksum 7018471698921779387, which "
            "diverges from the shipped U0001__cas.sql",
        ),
        (
            [*history_of(*range(1, 11)), HistoryRow(11, "audit", APPLIED_ON, "5")],
            "records migration 11 (audit), which this si-layer-cache does not ship",
        ),
        (
            [HistoryRow(1, "cas", APPLIED_ON, "not-a-number")],
            "with checksum 'not-a-number', which is not an unsigned 64-bit number",
        ),
        (
            [HistoryRow(1, "cas", APPLIED_ON, str(1 << 64))],
            "which is not an unsigned 64-bit number",
        ),
        (
            [HistoryRow(1, "cas", "yesterday", str(REFINERY_CHECKSUMS[1, "cas"]))],
            "with applied_on 'yesterday', which is not an RFC 3339 time",
        ),
    ],
    ids=["checksum", "name", "unknown-version", "checksum-text", "checksum-range", "applied-on"],
)
def test_a_history_refinery_would_refuse_is_refused_before_anything_is_applied(
    history: list[HistoryRow], message: str
) -> None:
    with pytest.raises(SchemaError) as raised:
        pending_migrations(shipped_migrations(), history)

    assert message in str(raised.value)
    assert str(raised.value).endswith("nothing was changed")


# --------------------------------------------------------------------------------------------
# run mode: what is missing


def test_schema_gaps_name_missing_tables_and_columns() -> None:
    found = {
        "cas": frozenset({"key", "sort_key", "created_at", "value", "serialization_lib"}),
        "change_batches": None,
        "rebase_batches": frozenset({"key", "value"}),
    }

    assert schema_gaps(found) == [
        "table change_batches does not exist",
        "table rebase_batches has no column sort_key, created_at",
    ]


def test_schema_gaps_are_empty_when_every_table_has_the_used_columns() -> None:
    columns = frozenset({"key", "sort_key", "created_at", "value"})

    assert schema_gaps({"cas": columns, "workspace_snapshots": columns}) == []
