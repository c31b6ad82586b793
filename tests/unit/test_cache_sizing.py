"""The cache tier's sizes: cgroup memory limits read as a container or a host has them, upstream's
shares, and the settings that override them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from layer_cache.disk_tier import BLOCK_BYTES, INDEX_ENTRY_BYTES
from services.cache_sizing import (
    DISK_DIR_NAME,
    MemoryLimit,
    cgroup_paths,
    disk_min_entry_bytes,
    memory_limit_from,
    parse_limit,
    plan_tier,
    share_of,
)
from services.settings import Settings

GIB = 1024**3

# This machine's kind: cgroup v1 memory controller, a v2 hierarchy without it (hybrid).
HYBRID = """9:name=systemd:/
4:memory:/process_api/dad0d7fb
2:cpuacct:/
0::/
"""


def reader(files: dict[str, str]) -> Callable[[PurePosixPath], str | None]:
    return lambda path: files.get(str(path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("536870912\n", 536870912),
        ("max\n", None),
        ("9223372036854771712\n", None),  # v1's "no limit"
        ("", None),
        ("-1", None),
        ("0", None),
    ],
)
def test_a_limit_file_is_bytes_or_no_limit(text: str, expected: int | None) -> None:
    assert parse_limit(text) == expected


def test_proc_self_cgroup_names_the_v2_path_and_the_v1_memory_path() -> None:
    assert cgroup_paths(HYBRID) == ("/", "/process_api/dad0d7fb")
    assert cgroup_paths("0::/kubepods.slice/pod1/cri-abc\n") == (
        "/kubepods.slice/pod1/cri-abc",
        None,
    )
    assert cgroup_paths("5:cpu,memory:/docker/abc\n") == (None, "/docker/abc")
    assert cgroup_paths("") == (None, None)


def test_a_namespaced_v2_container_reads_its_own_memory_max() -> None:
    limit = memory_limit_from("0::/\n", reader({"/sys/fs/cgroup/memory.max": "1073741824\n"}))
    assert limit == MemoryLimit(GIB, "cgroup v2 /sys/fs/cgroup/memory.max")


def test_on_a_v2_host_the_smallest_limit_up_the_path_counts() -> None:
    files = {
        "/sys/fs/cgroup/kubepods/pod1/ctr/memory.max": "max\n",
        "/sys/fs/cgroup/kubepods/pod1/memory.max": str(2 * GIB),
        "/sys/fs/cgroup/kubepods/memory.max": str(8 * GIB),
    }
    limit = memory_limit_from("0::/kubepods/pod1/ctr\n", reader(files))
    assert limit == MemoryLimit(2 * GIB, "cgroup v2 /sys/fs/cgroup/kubepods/pod1/memory.max")


def test_a_v1_container_whose_mount_is_its_own_cgroup_reads_the_root_file() -> None:
    files = {"/sys/fs/cgroup/memory/memory.limit_in_bytes": str(512 * 1024**2)}
    limit = memory_limit_from("4:memory:/docker/abc\n", reader(files))
    assert limit == MemoryLimit(
        512 * 1024**2, "cgroup v1 /sys/fs/cgroup/memory/memory.limit_in_bytes"
    )


def test_no_limit_anywhere_is_none_so_the_host_memory_is_used() -> None:
    files = {
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
        "/sys/fs/cgroup/memory/process_api/dad0d7fb/memory.limit_in_bytes": "9223372036854771712",
    }
    assert memory_limit_from(HYBRID, reader(files)) is None


def test_upstreams_share_is_the_usable_part_of_what_the_reserve_leaves() -> None:
    assert share_of(1000, 40, 100) == 600
    assert share_of(1000, 40, 50) == 300
    assert share_of(10 * GIB, 5, 100) == int(10 * GIB * 0.95)


def settings(**server: object) -> Settings:
    return Settings.model_validate({"server": {"write_queue_dir": "/volume/queue", **server}})


def test_by_default_the_tier_takes_upstreams_shares_of_the_pod_and_the_volume() -> None:
    plan = plan_tier(
        settings(),
        memory=lambda: MemoryLimit(GIB, "cgroup v2 /sys/fs/cgroup/memory.max"),
        volume=lambda path: 100 * GIB if path == Path("/volume/queue") / DISK_DIR_NAME else 0,
    )
    assert plan.memory_bytes == int(GIB * 0.6)
    assert "cgroup v2 /sys/fs/cgroup/memory.max" in plan.memory_source
    assert plan.disk_path == Path("/volume/queue/cache")
    assert plan.disk_bytes == 95 * GIB
    assert plan.disk_reserve_free_bytes == 5 * GIB
    assert plan.disk_min_entry_bytes == disk_min_entry_bytes(95 * GIB, int(GIB * 0.6))


def test_upstreams_cache_config_names_change_the_shares_and_the_path() -> None:
    plan = plan_tier(
        Settings.model_validate(
            {
                "layer_db_config": {
                    "cache_config": {
                        "memory_reserved_percent": 50,
                        "memory_usable_max_percent": 50,
                        "disk_reserved_percent": 10,
                        "disk_usable_max_percent": 50,
                        "disk_path": "/elsewhere",
                    }
                }
            }
        ),
        memory=lambda: MemoryLimit(4 * GIB, "host"),
        volume=lambda path: 10 * GIB,
    )
    assert plan.memory_bytes == GIB
    assert plan.disk_path == Path("/elsewhere")
    assert plan.disk_bytes == int(10 * GIB * 0.9 * 0.5)
    assert plan.disk_reserve_free_bytes == GIB


def test_byte_settings_override_the_shares_and_zero_turns_a_tier_off() -> None:
    def no_io() -> MemoryLimit:
        raise AssertionError("the memory limit is not read when bytes are given")

    plan = plan_tier(
        settings(cache_memory_bytes="64MiB", cache_disk_bytes="1GiB"),
        memory=no_io,
        volume=lambda path: 100 * GIB,
    )
    assert (plan.memory_bytes, plan.disk_bytes) == (64 * 1024**2, GIB)
    no_disk = plan_tier(
        settings(cache_memory_bytes=GIB, cache_disk_bytes=0), memory=no_io, volume=lambda path: GIB
    )
    assert (no_disk.disk_bytes, no_disk.disk_source) == (0, "SI_SDF__SERVER__CACHE_DISK_BYTES is 0")
    off = plan_tier(settings(cache_memory_bytes=0), memory=no_io, volume=lambda path: GIB)
    assert (off.memory_bytes, off.disk_bytes, off.disk_path) == (0, 0, None)


def no_io_limit() -> MemoryLimit:
    return MemoryLimit(GIB, "host")


def test_disk_layer_false_is_memory_only() -> None:
    plan = plan_tier(
        Settings.model_validate({"layer_db_config": {"cache_config": {"disk_layer": False}}}),
        memory=no_io_limit,
        volume=lambda path: GIB,
    )
    assert plan.disk_bytes == 0
    assert plan.disk_path is None
    assert plan.disk_source == "disk_layer is off"


def test_small_disk_entries_are_charged_so_the_index_fits_half_the_memory_budget() -> None:
    memory = 100 * 1024**2
    disk = 1024 * GIB
    charged = disk_min_entry_bytes(disk, memory)
    assert (disk // charged) * INDEX_ENTRY_BYTES <= memory // 2
    assert disk_min_entry_bytes(GIB, GIB) == BLOCK_BYTES


def test_a_percentage_over_100_is_refused() -> None:
    with pytest.raises(ValueError, match="less than or equal to 100"):
        Settings.model_validate(
            {"layer_db_config": {"cache_config": {"memory_reserved_percent": 101}}}
        )
