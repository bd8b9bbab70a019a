"""The crash indexer: finds crash files and foreign run folders, and files them under runs.

Three parts, each testable alone: `classify` and `read_fact` (`runnerd.index_files`: is
this a file we index, and what does it say, read on a worker thread, never whole for a
core dump; a foreign metadata.json is checked by `runnerd.foreign_runs`) and `apply_fact`
(`runnerd.index_filing`: what it means for which run, applied through the registry). The
`Indexer` here drives them: a full scan when a directory is added, watchfiles to follow it
afterwards, and a scan of a run's folder when the run fails.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import watchfiles

from runnerd.foreign_runs import IMPORT_CAUSE, SOURCE
from runnerd.index_files import (
    Fact,
    FileKind,
    classify,
    read_all,
    scan,
    scan_folders,
    shown_path,
    skipped_below,
)
from runnerd.index_filing import apply_fact
from runnerd.mounts import mount_of, read_mountinfo
from runnerd.registry import BatchResult, Registry
from runnerd_client.trust import UntrustedPath, check_own_folder

log = logging.getLogger(__name__)
FOLLOW_RETRY = 5.0
DEBOUNCE_MS = 200
WATCH_OVERLAP = 4 * DEBOUNCE_MS / 1000  # a replaced watcher's last debounce, with margin
# Reading these never ends (/proc/self/pagemap) or blocks (a FIFO in /dev); none holds runs.
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")
PSEUDO_FILESYSTEMS = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "mqueue",
        "hugetlbfs",
        "autofs",
        "binfmt_misc",
        "efivarfs",
        "selinuxfs",
        "rpc_pipefs",
        "nsfs",
    }
)


def check_watchable(folder: str) -> None:
    """Refuse (UntrustedPath) a folder to watch that belongs to the system's pseudo
    filesystems (reading /proc never ends), is not ours, or anyone may write to."""
    real = os.path.realpath(folder)
    if any(real == top or real.startswith(top + "/") for top in SYSTEM_FOLDERS):
        raise UntrustedPath(folder, f"{real} is a system folder, not a folder of runs")
    mount = mount_of(real, read_mountinfo())
    if mount is not None and mount[1] in PSEUDO_FILESYSTEMS:
        raise UntrustedPath(folder, f"it is on a {mount[1]} pseudo filesystem ({mount[0]})")
    check_own_folder(os.stat(folder), folder)


class CrashFilter(watchfiles.DefaultFilter):
    """watchfiles filter: added or modified files that `classify` knows, and added folders
    (files made in a new folder before its watch is set up are found by scanning it)."""

    def __call__(self, change: watchfiles.Change, path: str) -> bool:
        if change == watchfiles.Change.deleted or not super().__call__(change, path):
            return False
        return classify(path) is not None or (
            change == watchfiles.Change.added and os.path.isdir(path)
        )


@dataclass(frozen=True)
class WatchPlan:
    """The folders to watch recursively, and those to watch alone."""

    recursive: tuple[str, ...]
    flat: tuple[str, ...]


def watch_plan(dirs: Iterable[str], skipped: set[str]) -> WatchPlan:
    """What to watch so that no skipped folder (one we cannot read, or another user's)
    is watched or hides others: a recursive watch stops adding watches at the first
    folder it cannot read, so every folder above a skipped one is watched alone, and each
    of its other subfolders recursively."""
    roots = list(dirs)
    flat: set[str] = set()
    for folder in skipped:
        root = next((r for r in roots if folder != r and _below(folder, (r,))), None)
        while root is not None and folder != root:
            folder = os.path.dirname(folder)
            flat.add(folder)
    recursive = [root for root in roots if root not in flat and root not in skipped]
    for folder in flat:
        try:
            with os.scandir(folder) as entries:
                recursive += [
                    e.path
                    for e in entries
                    if e.is_dir(follow_symlinks=False)
                    and e.path not in flat
                    and e.path not in skipped
                ]
        except OSError:
            continue
    return WatchPlan(tuple(sorted(recursive)), tuple(sorted(flat)))


# --- the driver ----------------------------------------------------------------


@dataclass
class Summary:
    """What one indexing pass did, for `runnerctl watch` to report."""

    imported: int = 0
    indexed: int = 0
    known: int = 0
    orphan: int = 0
    warnings: list[str] | None = None

    def as_reply(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "indexed": self.indexed,
            "known": self.known,
            "orphans": self.orphan,
            "warnings": self.warnings or [],
        }


class Indexer:
    """Scans directories when they are added, follows them with watchfiles, and scans a
    run's folder when the run fails. Nothing it reads can stop it or the daemon: each
    file's handling, each pass and each watcher is guarded, a failure is logged."""

    def __init__(self, registry: Registry, extra_dirs: Iterable[str] = ()) -> None:
        self.registry = registry
        self.extra_dirs = set(extra_dirs)
        self.dirs: set[str] = set()
        self._changed = anyio.Event()
        self._failed_dirs: list[str] = []
        self._failure_seen = anyio.Event()
        self._refused: dict[str, str] = {}
        self._skipped: set[str] = set()

    async def load(self) -> None:
        """The directories added with `watch`, and those the config names."""
        watched = await self.registry.read(lambda s: s.indexing.watched_dirs())
        self.dirs = set(watched) | self.extra_dirs

    async def add(self, folder: str) -> Summary:
        """Watch `folder` from now on: scan it once in full, then follow it. UntrustedPath
        for a folder `check_watchable` refuses."""
        await anyio.to_thread.run_sync(check_watchable, folder)
        await self.registry.submit(lambda s: s.indexing.add_watched_dir(folder, time.time()))
        summary = await self.index(await anyio.to_thread.run_sync(scan, folder))
        self.dirs.add(folder)
        self._changed.set()
        return summary

    async def remove(self, folder: str) -> bool:
        removed: bool = await self.registry.submit(lambda s: s.indexing.remove_watched_dir(folder))
        self.dirs.discard(folder)
        self._changed.set()
        return removed

    async def index(self, facts: Iterable[Fact]) -> Summary:
        """File every fact; a malformed file, or one the registry refuses, is a warning."""
        summary = Summary(warnings=[])
        pending = []
        for fact in facts:
            if fact.problem is not None:
                _warn(summary, fact.path, fact.problem)
                if fact.kind is FileKind.FOLDER and fact.path not in self._skipped:
                    self._skipped.add(fact.path)
                    self._changed.set()  # watched no more, nor hiding others (watch_plan)
                continue
            if fact.note is not None:
                _warn(summary, fact.path, fact.note, filed=True)
            pending.append(
                (fact, self.registry.submit(partial(apply_fact, fact=fact, at=time.time())))
            )
        for fact, future in pending:
            try:
                outcome = await future
            except Exception as exc:
                _warn(summary, fact.path, f"not filed: {exc}")
                continue
            setattr(summary, outcome, getattr(summary, outcome) + 1)
        return summary

    def on_commit(self, result: BatchResult) -> None:
        """A run that just failed gets its folder scanned for crash files (an imported
        one's only when it ends after its import: the import scanned the folder)."""
        for t in result.effects.transitions:
            row = result.rows.get(t.run_id)
            if (
                t.to_state.value.startswith("failed")
                and row
                and row.run_dir
                and (t.source, t.cause) != (SOURCE, IMPORT_CAUSE)
            ):
                self._failed_dirs.append(row.run_dir)
                self._failure_seen.set()

    async def follow_failures(self) -> None:
        while True:
            await self._failure_seen.wait()
            self._failure_seen = anyio.Event()
            folders, self._failed_dirs = self._failed_dirs, []
            try:
                facts = await anyio.to_thread.run_sync(scan_folders, folders)
                await self.index(f for f in facts if f.kind is not FileKind.METADATA)
            except Exception:
                log.exception("indexing the folders of failed runs failed: %s", folders)

    def _followable(self) -> list[str]:
        """The watched folders that exist and `check_watchable` accepts; one it refuses
        (made writable by others since, say) is warned about once and left alone."""
        dirs = []
        for folder in sorted(self.dirs):
            try:
                check_watchable(folder)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if self._refused.get(folder) != str(exc):
                    log.warning("not following %s: %s", folder, exc)
                    self._refused[folder] = str(exc)
                continue
            self._refused.pop(folder, None)
            dirs.append(folder)
        return dirs

    async def follow_dirs(self) -> None:
        """Follow the watched directories, with new watchers each time the plan changes (a
        folder added or removed, a folder skipped, a new folder beside a skipped one).

        New watchers start before the old ones stop, so no change falls in between, and
        what they newly cover is scanned once they are in place (importing is idempotent):
        at start, everything, for what changed while the daemon was down.
        """
        current: tuple[WatchPlan, anyio.Event] | None = None
        stops: list[anyio.Event] = []
        async with anyio.create_task_group() as tg:
            try:
                while True:
                    self._changed = anyio.Event()
                    dirs = await anyio.to_thread.run_sync(self._followable)
                    if current is None:
                        self._skipped |= await anyio.to_thread.run_sync(skipped_below, dirs)
                    plan = await anyio.to_thread.run_sync(watch_plan, dirs, set(self._skipped))
                    if current is not None and plan == current[0]:
                        await self._changed.wait()
                        continue
                    stop = anyio.Event()
                    stops.append(stop)
                    for folders, recursive in ((plan.recursive, True), (plan.flat, False)):
                        if folders:
                            tg.start_soon(self._follow, folders, recursive, stop)
                    await anyio.sleep(0)  # the new watchers register their watches now
                    if current is None:
                        tg.start_soon(self._rescan, dirs)
                    else:
                        new = [d for d in plan.recursive if not _below(d, current[0].recursive)]
                        tg.start_soon(self._rescan, new, logging.DEBUG)
                        tg.start_soon(_stop_after_overlap, current[1], stops)
                    current = (plan, stop)
                    await self._changed.wait()
            finally:
                # Cancelling cannot interrupt watchfiles' thread, its stop event can: within
                # 50 ms instead of the 5 s rust timeout (BUG-4).
                for stop in stops:
                    stop.set()

    async def _follow(self, dirs: Sequence[str], recursive: bool, stop: anyio.Event) -> None:
        """Index what changes in `dirs` (and below them, if `recursive`) until `stop`. A
        watcher that fails (a watched folder removed, the inotify limit reached) is started
        again after FOLLOW_RETRY s and a rescan of what it missed."""
        while True:
            try:
                async for changes in watchfiles.awatch(
                    *dirs,
                    watch_filter=CrashFilter(),
                    stop_event=stop,
                    debounce=DEBOUNCE_MS,
                    recursive=recursive,
                    ignore_permission_denied=True,
                ):
                    paths = sorted({path for _, path in changes})
                    await self.index(await anyio.to_thread.run_sync(read_all, paths))
                    if not recursive and any(os.path.isdir(path) for path in paths):
                        self._changed.set()  # a new folder beside a skipped one: watch it
                return
            except Exception as exc:
                log.warning(
                    "following %s failed (%s: %s); following again in %g s",
                    ", ".join(dirs),
                    type(exc).__name__,
                    exc,
                    FOLLOW_RETRY,
                )
            with anyio.move_on_after(FOLLOW_RETRY):
                await stop.wait()
            dirs = [d for d in dirs if os.path.isdir(d)]
            if stop.is_set() or not dirs:
                return
            await self._rescan(dirs)

    async def _rescan(self, dirs: list[str], level: int = logging.INFO) -> None:
        for folder in dirs:
            try:
                summary = await self.index(await anyio.to_thread.run_sync(scan, folder))
            except Exception:
                log.exception("rescanning %s failed", folder)
                continue
            log.log(
                level,
                "rescanned %s: %d imported, %d crash files indexed, %d warning(s)",
                folder,
                summary.imported,
                summary.indexed,
                len(summary.warnings or ()),
            )


async def _stop_after_overlap(stop: anyio.Event, stops: list[anyio.Event]) -> None:
    """Stop a replaced watcher once it has passed on what it saw before its successor was
    in place: a stopped watcher drops the changes it holds back for the debounce."""
    await anyio.sleep(WATCH_OVERLAP)
    stop.set()
    stops.remove(stop)


def _below(folder: str, tops: Iterable[str]) -> bool:
    """Whether `folder` is one of `tops` or inside one of them."""
    return any(folder == top or folder.startswith(top.rstrip("/") + "/") for top in tops)


def _warn(summary: Summary, path: str, problem: str, filed: bool = False) -> None:
    assert summary.warnings is not None
    summary.warnings.append(f"{shown_path(path)}: {problem}")
    log.warning(
        "%s: %s: %s", "indexed all the same" if filed else "not indexed", shown_path(path), problem
    )
