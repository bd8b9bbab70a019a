"""What a run uses, measured from its processes: the figures the resource sampler keeps.

Sampling is by process, not by run: many runs share their processes (Dask workers,
`rd.sweep` in process, long-lived services), so the runs attached to the same processes
form one `Group`, sampled once per round from the process table; each run's `Usage` takes
its group's figures only when they changed. Which memory cgroup each process is in, and
each cgroup's limit, are read once and refreshed every `REFRESH` seconds (`Cgroups`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runnerd_client.procinfo import (
    UNLIMITED,
    Proc,
    cgroup_dir,
    folder_limit,
    machine_memory,
    oom_kills,
    with_descendants,
)

HISTORY_POINTS = 120
REFRESH = 60.0
"""Seconds a process's cgroup, a cgroup's limit and the machine's memory are trusted."""
CPU_STEP = 0.2
"""CPU seconds that count as progress when used within CPU_WINDOW (a third of a percent of
a core): an idle process's timers, a heartbeat thread, and runnerctl exec beating for its
command every half second stay far below it; any real work reaches it at once."""
CPU_WINDOW = 60.0


@dataclass
class Cgroups:
    """Which memory cgroup each process is in and each cgroup's limit, read once and
    trusted for REFRESH seconds. A process seen for the first time is read again the next
    round: `exec --memory` moves its command into the cgroup just after it starts."""

    machine: int = 0
    machine_at: float = float("-inf")
    _of_pid: dict[int, tuple[float, Path | None, bool]] = field(default_factory=dict)
    _limits: dict[Path | None, tuple[float, int]] = field(default_factory=dict)

    def folder(self, pid: int, now: float) -> Path | None:
        known = self._of_pid.get(pid)
        if known is not None and known[2] and now - known[0] < REFRESH:
            return known[1]
        folder = cgroup_dir(pid)
        self._of_pid[pid] = (now, folder, known is not None)
        return folder

    def limit(self, folder: Path | None, now: float) -> int:
        if now - self.machine_at >= REFRESH:
            self.machine, self.machine_at = machine_memory(), now
        known = self._limits.get(folder)
        if known is None or now - known[0] >= REFRESH:
            known = (now, folder_limit(folder, self.machine))
            self._limits[folder] = known
        return known[1]

    def keep(self, pids: set[int]) -> None:
        """Forget processes that are gone (their pids may be reused)."""
        for pid in [p for p in self._of_pid if p not in pids]:
            del self._of_pid[pid]
        if len(self._limits) > 4096:
            self._limits.clear()


@dataclass
class Group:
    """The processes of one set of attached roots and their descendants, sampled once a
    round for every run attached to exactly those roots."""

    roots: frozenset[int]
    runs: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)  # runs that joined since the last round
    pids: set[int] = field(default_factory=set)
    rss: int = 0
    threads: int = 0
    limit: int = 0
    folders: frozenset[Path] = frozenset()
    cpu_by_pid: dict[int, float] = field(default_factory=dict)
    cpu: float = 0.0  # CPU seconds of every process seen in the group (the gone keep theirs)
    version: int = 0  # bumped whenever the figures above change
    stopped: bool = False  # every leaf of the tree is stopped (T, t)
    moved_at: float | None = None  # when its CPU last grew by CPU_STEP within CPU_WINDOW
    _window: tuple[float, float] = (float("-inf"), 0.0)  # (since, CPU seconds since)

    def sample(
        self, table: dict[int, Proc], children: dict[int, list[int]], cgroups: Cgroups, now: float
    ) -> bool:
        """Read the group's processes from `table`; whether any figure changed."""
        pids = with_descendants(self.roots, table, children)
        if not pids:
            return False
        rss = threads = 0
        cpu, limit, folders = self.cpu, UNLIMITED, set()
        for pid in pids:
            proc = table[pid]
            rss += proc.rss
            threads += proc.threads
            cpu += proc.cpu - self.cpu_by_pid.get(pid, 0.0)
            self.cpu_by_pid[pid] = proc.cpu
            folder = cgroups.folder(pid, now)
            limit = min(limit, cgroups.limit(folder, now))
            if folder is not None:
                folders.add(folder)
        self.stopped = all(
            table[p].state in "Tt" for p in pids if not any(c in pids for c in children.get(p, ()))
        )
        figures = (rss, threads, round(cpu, 3), limit, frozenset(folders))
        changed = (
            figures != (self.rss, self.threads, round(self.cpu, 3), self.limit, self.folders)
            or pids != self.pids
        )
        self.pids, self.rss, self.threads, self.limit = pids, rss, threads, limit
        self._count_cpu(cpu - self.cpu, now)
        self.folders, self.cpu = frozenset(folders), cpu
        if changed:
            self.version += 1
        return changed

    def _count_cpu(self, used: float, now: float) -> None:
        since, total = self._window
        if now - since > CPU_WINDOW:
            since, total = now, 0.0
        total += used
        if total >= CPU_STEP:
            self.moved_at, since, total = now, now, 0.0
        self._window = (since, total)


@dataclass
class Usage:
    """What the sampler knows of one run."""

    limit_bytes: int = 0
    peak_rss_bytes: int = 0
    rss_bytes: int = 0
    threads: int = 0
    cpu: float = 0.0
    history: list[list[float]] = field(default_factory=list)
    above: bool = False
    oom_bases: dict[Path, int | None] = field(default_factory=dict)
    group: Group | None = None
    version: int = -1  # the group's version last applied
    ended_at: float | None = None  # when the run stopped being sampled
    saved: dict[str, Any] | None = None  # the sample last handed to the registry

    @property
    def cpu_seconds(self) -> float:
        return round(self.cpu, 3)

    def apply(self, group: Group, now: float) -> None:
        """Take the group's figures (a run counts every process it is attached to)."""
        self.version = group.version
        self.limit_bytes = group.limit
        self.rss_bytes = group.rss
        self.threads = group.threads
        self.peak_rss_bytes = max(self.peak_rss_bytes, group.rss)
        self.cpu = max(self.cpu, group.cpu)
        for folder in group.folders:
            if folder not in self.oom_bases:
                self.oom_bases[folder] = oom_kills(folder)
        self.record(now, group.rss)

    def record(self, now: float, rss: int) -> None:
        """Keep one [minute, min, max] point per minute that saw a change (a minute like
        the one before is left out), the last HISTORY_POINTS of them."""
        minute = float(int(now // 60) * 60)
        if self.history and self.history[-1][0] == minute:
            point = self.history[-1]
            point[1], point[2] = min(point[1], rss), max(point[2], rss)
        else:
            self.history.append([minute, rss, rss])
            del self.history[:-HISTORY_POINTS]

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_rss_bytes": self.peak_rss_bytes,
            "rss_bytes": self.rss_bytes,
            "cpu_seconds": self.cpu_seconds,
            "limit_bytes": self.limit_bytes,
            "threads": self.threads,
            "history": [list(p) for p in self.history],
        }

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer struck one of the run's cgroups since first seen."""
        for folder, base in self.oom_bases.items():
            now = oom_kills(folder)
            if now is not None and base is not None and now > base:
                return True
        return False


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"
