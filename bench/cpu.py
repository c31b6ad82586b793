"""Where the machine's CPU went during a timed section: the servers', and everyone else's.

The client's CPU comes from ``getrusage``; the servers are other processes, read from
``/proc``: the S3 server is one process (s3rver or moto), PostgreSQL is the postmaster plus its
backends (live ones read directly, exited ones through the postmaster's ``cutime``/``cstime``).
The machine's busy time comes from ``/proc/stat``. What is left (busy minus client, S3 and
Postgres) is load from processes outside the benchmark; on a shared machine it says how far to
trust a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()


def process_cpu_s(pid: int, *, with_reaped_children: bool = False) -> float:
    """User + system seconds of one process (plus its waited-for children's, if asked)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[1] == str(pid):
            children.append(int(entry.name))
    return children


def postgres_cpu_s(postmaster_pid: int) -> float:
    """The cluster's CPU so far: postmaster, live backends, and backends that have exited."""
    total = process_cpu_s(postmaster_pid, with_reaped_children=True)
    return total + sum(process_cpu_s(child) for child in _children(postmaster_pid))


def machine_busy_s() -> float:
    """CPU seconds every CPU spent not idle (all CPUs summed) since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def find_process(*needles: str) -> int | None:
    """The first process whose command line contains every needle."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(needle in command for needle in needles):
            return int(entry.name)
    return None


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative CPU seconds at one moment."""

    machine: float
    s3: float
    pg: float

    @classmethod
    def take(cls, s3_pid: int | None, pg_pid: int | None) -> CpuSnapshot:
        """Read the counters now."""
        return cls(
            machine=machine_busy_s(),
            s3=process_cpu_s(s3_pid) if s3_pid else 0.0,
            pg=postgres_cpu_s(pg_pid) if pg_pid else 0.0,
        )


@dataclass(frozen=True)
class CpuSpent:
    """CPU seconds spent over a timed section."""

    machine: float
    s3: float
    pg: float
    client: float
    wall: float
    cpus: int

    @classmethod
    def between(
        cls, before: CpuSnapshot, after: CpuSnapshot, *, client: float, wall: float
    ) -> CpuSpent:
        """The difference, with the client's own CPU and the section's wall time."""
        return cls(
            machine=after.machine - before.machine,
            s3=after.s3 - before.s3,
            pg=after.pg - before.pg,
            client=client,
            wall=wall,
            cpus=len(os.sched_getaffinity(0)),
        )

    @property
    def other(self) -> float:
        """Busy time of processes outside the benchmark (never below zero)."""
        return max(self.machine - self.client - self.s3 - self.pg, 0.0)

    @property
    def other_share(self) -> float:
        """That busy time as a share of the machine's capacity over the section."""
        capacity = self.wall * self.cpus
        return self.other / capacity if capacity > 0 else 0.0
