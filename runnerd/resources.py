"""Per-run resources measured from outside: memory, CPU, limits, and OOM kills named.

The daemon already knows every process attached to a run. A sampler reads them and
their descendants from /proc off the event loop, keeps per run the peak RSS, the CPU
seconds, the effective memory limit (the cgroup's, else the machine's) and a short
history, and warns once each time a run crosses `threshold` of its limit. It is still
there after a kill to say whether the kernel's OOM killer did it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from runnerd.registry import Registry, StorageError

log = logging.getLogger(__name__)
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
CGROUP_ROOT = Path("/sys/fs/cgroup")
HISTORY_POINTS = 120
UNLIMITED = 1 << 60
KEEP_ENDED = 60.0


def _read(path: Path | str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode()
    except OSError:
        return None


def machine_memory() -> int:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return UNLIMITED


def cgroup_dir(pid: int | str) -> Path | None:
    """The memory cgroup folder of a process (cgroup v2, else v1's memory controller)."""
    v1 = v2 = None
    for line in (_read(f"/proc/{pid}/cgroup") or "").splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and not controllers:
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    key = (v1, v2)
    if key not in _FOLDERS:
        folder = _cgroup_folder(v1, v2)
        if folder is None:
            return None  # not cached: a v2 cgroup may get its memory controller later
        if len(_FOLDERS) >= 4096:
            _FOLDERS.clear()
        _FOLDERS[key] = folder
    return _FOLDERS[key]


_FOLDERS: dict[tuple[str | None, str | None], Path] = {}


def _cgroup_folder(v1: str | None, v2: str | None) -> Path | None:
    if v1 is not None and (CGROUP_ROOT / "memory").is_dir():
        return CGROUP_ROOT / "memory" / v1.lstrip("/")
    if v2 is not None:
        for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
            if (base / v2.lstrip("/") / "memory.max").exists():
                return base / v2.lstrip("/")
    return None


def folder_limit(folder: Path | None, machine: int) -> int:
    """A memory cgroup's limit, capped by the machine's memory."""
    if folder is None:
        return machine
    for name in ("memory.max", "memory.limit_in_bytes"):
        text = (_read(folder / name) or "").strip()
        if text.isdigit():
            return min(int(text), machine)
    return machine


def memory_limit(pid: int | str) -> int:
    """The effective memory limit of a process: its cgroup's, else the machine's memory."""
    return folder_limit(cgroup_dir(pid), machine_memory())


def cgroup_peak(folder: Path | None) -> int | None:
    """The most memory the cgroup ever used, as the kernel counts it (v2, then v1)."""
    if folder is None:
        return None
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        text = (_read(folder / name) or "").strip()
        if text.isdigit():
            return int(text)
    return None


def oom_kills(folder: Path | None) -> int | None:
    """The cgroup's OOM-kill counter (v2 memory.events, v1 memory.oom_control)."""
    if folder is None:
        return None
    for name in ("memory.events", "memory.oom_control"):
        for line in (_read(folder / name) or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def process_table() -> dict[int, tuple[int, float, int, int]]:
    """pid -> (parent pid, CPU seconds, RSS bytes, threads), for every process in /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            continue
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS,
                                  int(fields[21]) * PAGE, int(fields[17]))
    return table


def children_of(table: dict[int, tuple[int, float, int, int]]) -> dict[int, list[int]]:
    """parent pid -> its children's pids."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, *_rest) in table.items():
        children[ppid].append(pid)
    return children


def with_descendants(roots: Iterable[int], table: dict[int, tuple[int, float, int, int]],
                     children: dict[int, list[int]] | None = None) -> set[int]:
    """The live `roots` and all their descendants; pass `children` (children_of the
    table) when calling it for many runs over one table."""
    if children is None:
        children = children_of(table)
    found, todo = set(), [p for p in roots if p in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, ())
    return found


@dataclass
class Usage:
    """What the sampler knows of one run."""

    limit_bytes: int = 0
    peak_rss_bytes: int = 0
    rss_bytes: int = 0
    threads: int = 0
    cpu_by_pid: dict[int, float] = field(default_factory=dict)
    history: list[list[float]] = field(default_factory=list)
    above: bool = False
    oom_bases: dict[Path, int | None] = field(default_factory=dict)
    last_seen: float = 0.0

    def learn_limits(self, pids: set[int], machine: int | None = None,
                     limits: dict[Path | None, int] | None = None) -> None:
        """The tightest memory cgroup among the run's processes sets its limit. Read at
        every sample: a process may move into its cgroup after it starts. `limits` keeps
        each cgroup's limit for one round (many runs share a cgroup)."""
        machine = machine_memory() if machine is None else machine
        limits = {} if limits is None else limits
        folders = {cgroup_dir(pid) for pid in pids}
        for folder in folders:
            if folder not in limits:
                limits[folder] = folder_limit(folder, machine)
        self.limit_bytes = min(limits[folder] for folder in folders)
        for folder in folders:
            if folder is not None and folder not in self.oom_bases:
                self.oom_bases[folder] = oom_kills(folder)

    @property
    def cpu_seconds(self) -> float:
        return round(sum(self.cpu_by_pid.values()), 3)

    def record(self, now: float, rss: int) -> None:
        """Keep one [minute, min, max] point per minute, the last HISTORY_POINTS of them."""
        minute = float(int(now // 60) * 60)
        if self.history and self.history[-1][0] == minute:
            point = self.history[-1]
            point[1], point[2] = min(point[1], rss), max(point[2], rss)
        else:
            self.history.append([minute, rss, rss])
            del self.history[:-HISTORY_POINTS]

    def as_dict(self) -> dict[str, Any]:
        return {"peak_rss_bytes": self.peak_rss_bytes, "rss_bytes": self.rss_bytes,
                "cpu_seconds": self.cpu_seconds, "limit_bytes": self.limit_bytes,
                "threads": self.threads, "history": self.history}

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer struck one of the run's cgroups since first seen."""
        for folder, base in self.oom_bases.items():
            now = oom_kills(folder)
            if now is not None and base is not None and now > base:
                return True
        return False


def measure(runs: dict[str, set[int]], usage: dict[str, Usage], threshold: float,
            now: float | None = None) -> list[str]:
    """Sample every run's processes (on a worker thread); return the runs that just
    crossed `threshold` of their memory limit."""
    now = time.time() if now is None else now
    table = process_table()
    children = children_of(table)
    machine = machine_memory()
    limits: dict[Path | None, int] = {}
    crossed = []
    for run_id, roots in runs.items():
        pids = with_descendants(roots, table, children)
        if not pids:
            continue
        use = usage.setdefault(run_id, Usage())
        use.learn_limits(pids, machine, limits)
        use.rss_bytes = sum(table[p][2] for p in pids)
        use.threads = sum(table[p][3] for p in pids)
        use.peak_rss_bytes = max(use.peak_rss_bytes, use.rss_bytes)
        use.cpu_by_pid.update({p: table[p][1] for p in pids})
        use.record(now, use.rss_bytes)
        use.last_seen = now
        above = use.rss_bytes >= threshold * use.limit_bytes
        if above and not use.above:
            crossed.append(run_id)
        use.above = above
    return crossed


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


class Sampler:
    """Samples every active run on a worker thread, persists what it found, warns once per
    crossing of the threshold, and explains deaths that the OOM killer caused."""

    def __init__(self, registry: Registry, runs: Callable[[], dict[str, set[int]]],
                 interval: float, threshold: float) -> None:
        self.registry = registry
        self.runs = runs
        self.interval = interval
        self.threshold = threshold
        self.usage: dict[str, Usage] = {}
        # Memory warnings a storage fault kept from the registry, with their samples.
        self._unsaved: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    async def run(self) -> None:
        while True:
            active = self.runs()
            crossed = await anyio.to_thread.run_sync(
                measure, active, self.usage, self.threshold)
            sampled = {run_id: self.usage[run_id].as_dict() for run_id in active
                       if run_id in self.usage}
            warnings = {run_id: self.warning(run_id) for run_id in crossed}
            self._record(sampled, warnings)
            for run_id in set(self.usage) - set(active):
                if time.time() - self.usage[run_id].last_seen > KEEP_ENDED:
                    del self.usage[run_id]  # kept a while: a death is judged after it
            near = any(u.above for u in self.usage.values())
            await anyio.sleep(min(1.0, self.interval) if near else self.interval)

    def _record(self, sampled: dict[str, dict[str, Any]],
                warnings: dict[str, dict[str, Any]]) -> None:
        """Persist a sample. A newer sample makes an older one moot, so one the disk refused
        is not retried as such: its warnings (and the samples they belong to) go with the next."""
        for run_id, (data, warning) in self._unsaved.items():
            sampled.setdefault(run_id, data)
            warnings.setdefault(run_id, warning)
        self._unsaved = {}
        if not sampled:
            return
        at = time.time()
        future = self.registry.submit(
            lambda store: store.attachments.put_resources(sampled, warnings, at))
        future.add_done_callback(partial(self._recorded, sampled, warnings))

    def _recorded(self, sampled: dict[str, dict[str, Any]], warnings: dict[str, dict[str, Any]],
                  done: asyncio.Future[None]) -> None:
        exc = None if done.cancelled() else done.exception()
        if exc is None:
            return
        log.warning("recording resources failed: %s", exc)
        if isinstance(exc, StorageError):
            kept = {run_id: (sampled[run_id], warning) for run_id, warning in warnings.items()}
            self._unsaved = {**kept, **self._unsaved}

    def warning(self, run_id: str) -> dict[str, Any]:
        use = self.usage[run_id]
        return {"rss_bytes": use.rss_bytes, "limit_bytes": use.limit_bytes,
                "message": f"memory at {use.rss_bytes / use.limit_bytes:.0%} of its limit "
                           f"({gib(use.rss_bytes)} of {gib(use.limit_bytes)})"}

    def peak_text(self, run_id: str) -> str:
        use = self.usage.get(run_id)
        if use is None or not use.limit_bytes:
            return ""
        return f"peak {gib(use.peak_rss_bytes)} of a {gib(use.limit_bytes)} limit"

    def explain_death(self, run_id: str) -> dict[str, Any] | None:
        """A failure naming the OOM killer, if its counter rose or the run was at its limit."""
        use = self.usage.get(run_id)
        if use is None or not (use.oom_killed() or use.above):
            return None
        return {"failure_class": "Signal:SIGKILL", "signal": "SIGKILL",
                "category_hint": "oom",
                "message": f"killed by the OOM killer: {self.peak_text(run_id)}"}
