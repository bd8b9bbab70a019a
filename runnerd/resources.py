"""Per-run resources measured from outside: memory, CPU, limits, and OOM kills named.

The daemon already knows every process attached to a run. A sampler reads them and
their descendants from /proc off the event loop, keeps per run the peak RSS, the CPU
seconds, the effective memory limit (the cgroup's, else the machine's) and a short
history, and warns once each time a run crosses `threshold` of its limit. It is still
there after a kill to say whether the kernel's OOM killer did it.

Sampling is by process, not by run (`runnerd.usage`): a run is updated, and its sample
written, only when the figures of its group of processes changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio

from runnerd.progress import Progress, Verdict
from runnerd.registry import BatchResult, Registry, StorageError
from runnerd.usage import Cgroups, Group, Usage, gib
from runnerd_client.procinfo import children_of, process_table

log = logging.getLogger(__name__)
KEEP_ENDED = 60.0


@dataclass
class Round:
    """What one sampling round found: the runs whose figures changed, and those that
    just crossed the memory threshold."""

    changed: list[str] = field(default_factory=list)
    crossed: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)  # stalled, stopped, moving again


class Sampler:
    """Samples every active run's processes on a worker thread, persists what changed,
    warns once per crossing of the threshold, and explains deaths the OOM killer caused."""

    def __init__(
        self,
        registry: Registry,
        runs: Callable[[], dict[str, set[int]]],
        interval: float,
        threshold: float,
        progress: Progress | None = None,
    ) -> None:
        self.registry = registry
        self.progress = progress
        self.runs = runs
        self.interval = interval
        self.threshold = threshold
        self.usage: dict[str, Usage] = {}
        self.groups: dict[frozenset[int], Group] = {}
        self.cgroups = Cgroups()
        self._regroup = True  # the runs' processes changed since the last round
        self._near: set[str] = set()  # runs above the threshold: sampled every second
        self._ended: dict[str, float] = {}  # runs no longer sampled, and since when
        # Memory warnings a storage fault kept from the registry, with their samples.
        self._unsaved: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    def on_commit(self, result: BatchResult) -> None:
        """A process attached or detached, or a run ended: group the runs again."""
        effects = result.effects
        if (
            effects.attached
            or effects.detached
            or any(t.to_state.terminal for t in effects.transitions)
        ):
            self._regroup = True

    def group_runs(self, now: float) -> list[str]:
        """Put every active run in the group of its processes (on the event loop: the
        process watcher's map is its own). Only after a process came or went. Returns the
        runs seen for the first time."""
        self._regroup = False
        new = []
        groups: dict[frozenset[int], Group] = {}
        active = self.runs()
        for run_id, pids in active.items():
            key = frozenset(pids)
            group = groups.get(key)
            if group is None:
                group = groups[key] = self.groups.get(key) or Group(key)
                group.runs = []
            group.runs.append(run_id)
            use = self.usage.get(run_id)
            if use is None:
                use = self.usage[run_id] = Usage()
                new.append(run_id)
            if use.group is not group:
                use.group, use.version = group, -1
                group.fresh.append(run_id)
            self._ended.pop(run_id, None)
        for run_id, use in self.usage.items():
            if use.group is not None and run_id not in active:
                use.group = None
                self._ended[run_id] = now
        self.groups = groups
        return new

    def heartbeat(self, run_id: str, at: float) -> None:
        """A heartbeat its code sent on purpose: evidence of progress."""
        if self.progress is not None:
            self.progress.heartbeat(run_id, at)

    def measure(self, now: float) -> Round:
        """Sample every group (on a worker thread); apply changed figures to their runs:
        a group whose figures did not change costs nothing per run."""
        table = process_table()
        children = children_of(table)
        found = Round()
        for group in self.groups.values():
            changed = group.sample(table, children, self.cgroups, now)
            targets, group.fresh = group.runs if changed else group.fresh, []
            if group.pids:
                for run_id in targets:
                    if (use := self.usage.get(run_id)) is not None and use.group is group:
                        self._apply(run_id, use, group, now, found)
        self.cgroups.keep(set(table))
        if self.progress is not None:
            found.verdicts = self.progress.check(self.group_of, now)
        return found

    def group_of(self, run_id: str) -> Group | None:
        """The sampled processes of a run, if it has live ones."""
        use = self.usage.get(run_id)
        return use.group if use is not None and use.group is not None and use.group.pids else None

    def _apply(self, run_id: str, use: Usage, group: Group, now: float, found: Round) -> None:
        use.apply(group, now)
        found.changed.append(run_id)
        above = use.rss_bytes >= self.threshold * use.limit_bytes
        if above and not use.above:
            found.crossed.append(run_id)
        use.above = above
        if above:
            self._near.add(run_id)
        else:
            self._near.discard(run_id)

    async def run(self) -> None:
        while True:
            await self.sample_once()
            near = any(self.usage[r].group is not None for r in self._near if r in self.usage)
            await anyio.sleep(min(1.0, self.interval) if near else self.interval)

    async def sample_once(self) -> Round:
        now = time.time()
        if self._regroup:
            new = self.group_runs(now)
            if self.progress is not None and new:
                await self.progress.load(self.registry, new)
        found = await anyio.to_thread.run_sync(self.measure, now)
        self._record(found, now)
        if self.progress is not None:
            self.progress.submit(self.registry, found.verdicts)
        for run_id in [r for r, ended in self._ended.items() if now - ended > KEEP_ENDED]:
            del self._ended[run_id]  # kept a while: a death is judged after it
            self.usage.pop(run_id, None)
            self._near.discard(run_id)
        return found

    def _record(self, found: Round, now: float) -> None:
        """Persist the samples that changed. A newer sample makes an older one moot, so one
        the disk refused is not retried as such: it is written again with the next change,
        and its warnings (with the samples they belong to) go with the next batch."""
        sampled = {}
        moved: set[str] = set()
        if self.progress is not None:
            moved, self.progress.moved = self.progress.moved, set()
        for run_id in [*found.changed, *(moved - set(found.changed))]:
            use = self.usage.get(run_id)
            if use is None or use.version < 0:
                continue
            data = use.as_dict()
            if self.progress is not None:
                data["progress"] = self.progress.public(run_id, use.group)
            if data != use.saved:
                sampled[run_id] = use.saved = data
        warnings = {run_id: self.warning(run_id) for run_id in found.crossed}
        for run_id, (data, warning) in self._unsaved.items():
            sampled.setdefault(run_id, data)
            warnings.setdefault(run_id, warning)
        self._unsaved = {}
        if not sampled:
            return
        future = self.registry.submit(
            lambda store: store.attachments.put_resources(sampled, warnings, now)
        )
        future.add_done_callback(partial(self._recorded, sampled, warnings))

    def _recorded(
        self,
        sampled: dict[str, dict[str, Any]],
        warnings: dict[str, dict[str, Any]],
        done: asyncio.Future[None],
    ) -> None:
        exc = None if done.cancelled() else done.exception()
        if exc is None:
            return
        log.warning("recording resources failed: %s", exc)
        for run_id in sampled:
            if (use := self.usage.get(run_id)) is not None:
                use.saved = None  # written again with its next sample
        if isinstance(exc, StorageError):
            kept = {run_id: (sampled[run_id], warning) for run_id, warning in warnings.items()}
            self._unsaved = {**kept, **self._unsaved}

    def warning(self, run_id: str) -> dict[str, Any]:
        use = self.usage[run_id]
        return {
            "rss_bytes": use.rss_bytes,
            "limit_bytes": use.limit_bytes,
            "message": f"memory at {use.rss_bytes / use.limit_bytes:.0%} of its limit "
            f"({gib(use.rss_bytes)} of {gib(use.limit_bytes)})",
        }

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
        return {
            "failure_class": "Signal:SIGKILL",
            "signal": "SIGKILL",
            "category_hint": "oom",
            "message": f"killed by the OOM killer: {self.peak_text(run_id)}",
        }
