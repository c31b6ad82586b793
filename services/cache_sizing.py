"""Sizes of the cache tier: upstream's shares of the pod's memory and of the cache volume.

Upstream (si-layer-cache ``hybrid_cache.rs``) gives its caches ``floor(total x (1 - reserved %)
x usable %)`` of the memory and of the disk (defaults: 40 % of memory reserved, 5 % of disk
reserved, 100 % of the rest usable), split per cache. Its memory total is the *host's*
(sysinfo); here it is the pod's: the cgroup memory limit (v2 ``memory.max``, v1
``memory.limit_in_bytes``, the smallest along the process's cgroup path up to the mount's root,
which covers a namespaced container and a plain host alike), and the host's memory only when no
cgroup sets a limit (the start-up line says which). The disk total is the size of the file system
that holds the cache directory (``statvfs``). Settings in bytes override either share.

The parsing is pure (``memory_limit_from``: the text of ``/proc/self/cgroup`` and a file reader);
``detect_memory_limit`` and ``volume_bytes`` are the I/O around it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from layer_cache.disk_tier import BLOCK_BYTES, INDEX_ENTRY_BYTES
from services.settings import Settings

CGROUP_ROOT = PurePosixPath("/sys/fs/cgroup")
V2_ROOTS = (CGROUP_ROOT, CGROUP_ROOT / "unified")
V1_MEMORY_ROOT = CGROUP_ROOT / "memory"
V2_LIMIT_FILE = "memory.max"
V1_LIMIT_FILE = "memory.limit_in_bytes"
V1_UNLIMITED = 1 << 62
"""cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages): anything above is it."""


@dataclass(frozen=True)
class MemoryLimit:
    """The memory the tier's share is taken of, and where that figure came from."""

    bytes: int
    source: str


def parse_limit(text: str) -> int | None:
    """A cgroup memory limit file's value in bytes; None for no limit ("max", v1's huge
    number) or text that is not a limit."""
    value = text.strip()
    if value == "max" or not value.isdigit():
        return None
    limit = int(value)
    return None if limit >= V1_UNLIMITED or limit == 0 else limit


def cgroup_paths(proc_self_cgroup: str) -> tuple[str | None, str | None]:
    """(the cgroup v2 path, the v1 memory controller's path) in ``/proc/self/cgroup``."""
    v2: str | None = None
    v1: str | None = None
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: PurePosixPath, path: str) -> list[PurePosixPath]:
    """``root/path`` and every directory above it up to ``root`` itself."""
    relative = PurePosixPath(path.strip() or "/").relative_to("/")
    here = root / relative
    chain = [here]
    while here != root:
        here = here.parent
        chain.append(here)
    return chain


def memory_limit_from(
    proc_self_cgroup: str, read: Callable[[PurePosixPath], str | None]
) -> MemoryLimit | None:
    """The smallest memory limit along this process's cgroup path, v2 then v1; ``read`` returns
    a file's text or None when it does not exist."""
    v2, v1 = cgroup_paths(proc_self_cgroup)
    candidates: list[PurePosixPath] = []
    if v2 is not None:
        for root in V2_ROOTS:
            candidates += [directory / V2_LIMIT_FILE for directory in _ancestors(root, v2)]
    if v1 is not None:
        candidates += [directory / V1_LIMIT_FILE for directory in _ancestors(V1_MEMORY_ROOT, v1)]
    best: MemoryLimit | None = None
    for candidate in candidates:
        text = read(candidate)
        limit = None if text is None else parse_limit(text)
        if limit is not None and (best is None or limit < best.bytes):
            version = "v2" if candidate.name == V2_LIMIT_FILE else "v1"
            best = MemoryLimit(limit, f"cgroup {version} {candidate}")
    return best


def share_of(total: int, reserved_percent: float, usable_max_percent: float) -> int:
    """Upstream's formula: what is left after the reserve, times the usable share (floored)."""
    usable = int(total * (1 - reserved_percent / 100))
    return int(usable * usable_max_percent / 100)


def _read_text(path: PurePosixPath) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def host_memory_bytes() -> int:
    """The machine's memory (``sysconf``), the fallback when no cgroup sets a limit."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_memory_limit() -> MemoryLimit:
    """The pod's memory limit, or the host's memory when no cgroup sets one."""
    found = memory_limit_from(_read_text(PurePosixPath("/proc/self/cgroup")) or "", _read_text)
    if found is not None:
        return found
    return MemoryLimit(host_memory_bytes(), "host memory (no cgroup memory limit is set)")


def volume_bytes(directory: Path) -> int:
    """The size of the file system holding ``directory`` (its nearest existing ancestor)."""
    here = directory
    while not here.exists() and here != here.parent:
        here = here.parent
    stat = os.statvfs(here)
    return stat.f_blocks * stat.f_frsize


DISK_DIR_NAME = "cache"
"""The disk tier's default directory inside the write queue's (the server's volume)."""
INDEX_SHARE_OF_MEMORY = 0.5
"""At most this share of the memory tier's budget goes to the disk tier's index."""


@dataclass(frozen=True)
class TierPlan:
    """The cache tier's sizes and where they came from (logged at start)."""

    memory_bytes: int
    memory_source: str
    disk_bytes: int
    disk_source: str
    disk_path: Path | None
    disk_reserve_free_bytes: int
    disk_min_entry_bytes: int


def plan_tier(
    settings: Settings,
    *,
    memory: Callable[[], MemoryLimit] = detect_memory_limit,
    volume: Callable[[Path], int] = volume_bytes,
) -> TierPlan:
    """The tier's sizes from the settings: a byte setting wins, else upstream's share of the
    pod's memory (and of the cache volume); the disk tier needs the memory tier (its index lives
    in memory) and ``disk_layer``."""
    cache, server = settings.layer_db_config.cache_config, settings.server
    if server.cache_memory_bytes is not None:
        memory_bytes, memory_source = (
            server.cache_memory_bytes,
            "SI_SDF__SERVER__CACHE_MEMORY_BYTES",
        )
    else:
        limit = memory()
        memory_bytes = share_of(
            limit.bytes, cache.memory_reserved_percent, cache.memory_usable_max_percent
        )
        memory_source = (
            f"{cache.memory_usable_max_percent}% of what {cache.memory_reserved_percent}% "
            f"reserved leaves of {limit.bytes} bytes: {limit.source}"
        )
    path = cache.disk_path or server.write_queue_dir / DISK_DIR_NAME
    if not cache.disk_layer or memory_bytes == 0 or server.cache_disk_bytes == 0:
        reason = "disk_layer is off" if not cache.disk_layer else "the memory tier is off"
        if server.cache_disk_bytes == 0:
            reason = "SI_SDF__SERVER__CACHE_DISK_BYTES is 0"
        return TierPlan(memory_bytes, memory_source, 0, reason, None, 0, 0)
    total = volume(path)
    reserve = int(total * cache.disk_reserved_percent / 100)
    if server.cache_disk_bytes is not None:
        disk_bytes, disk_source = server.cache_disk_bytes, "SI_SDF__SERVER__CACHE_DISK_BYTES"
    else:
        disk_bytes = share_of(total, cache.disk_reserved_percent, cache.disk_usable_max_percent)
        disk_source = (
            f"{cache.disk_usable_max_percent}% of what {cache.disk_reserved_percent}% reserved "
            f"leaves of the {total}-byte volume"
        )
    return TierPlan(
        memory_bytes,
        memory_source,
        disk_bytes,
        disk_source,
        path,
        reserve,
        disk_min_entry_bytes(disk_bytes, memory_bytes),
    )


def disk_min_entry_bytes(disk_bytes: int, memory_bytes: int) -> int:
    """The least a disk entry is charged, so the disk index (``INDEX_ENTRY_BYTES`` a entry) fits
    in ``INDEX_SHARE_OF_MEMORY`` of the memory budget: at least a 4 KiB block."""
    max_entries = max(1, int(memory_bytes * INDEX_SHARE_OF_MEMORY) // INDEX_ENTRY_BYTES)
    return max(BLOCK_BYTES, -(-disk_bytes // max_entries))
