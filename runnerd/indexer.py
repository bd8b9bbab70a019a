"""The crash indexer: finds crash files and foreign run folders, and files them under runs.

Three parts, each testable alone: `classify` (the filter: is this a file we index?),
`read_fact` (what the file says, read on a worker thread, never whole for a core dump)
and `apply_fact` (what it means for which run, applied through the registry). The
`Indexer` drives them: a full scan when a directory is added, watchfiles to follow
it afterwards, and a scan of a run's folder when the run fails.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import watchfiles

from runnerd.crashfiles import CRASH_LOG, native_crash, read_tail
from runnerd.registry import BatchResult, Registry, Store
from runnerd.states import failure_record
from runnerd_client.ids import is_valid_run_id
from runnerd_client.protocol import FailReason, State

log = logging.getLogger(__name__)
MAX_METADATA = 1 << 20
SOURCE = "imported"
OWNER_DEPTH = 3


class FileKind(enum.StrEnum):
    """The files the indexer reads."""

    METADATA = "metadata"
    CRASH_LOG = "crash_log"
    TRACEBACK = "traceback"
    CORE = "core"


def classify(path: str | Path) -> FileKind | None:
    """What kind of indexed file `path` names, by its name alone; None for anything else."""
    name = os.path.basename(path)
    if name == "metadata.json":
        return FileKind.METADATA
    if name == CRASH_LOG:
        return FileKind.CRASH_LOG
    if fnmatch.fnmatch(name, "traceback*.txt") or name.endswith(".traceback"):
        return FileKind.TRACEBACK
    if name == "core" or fnmatch.fnmatch(name, "core.*"):
        return FileKind.CORE
    return None


class CrashFilter(watchfiles.DefaultFilter):
    """watchfiles filter: added or modified files that `classify` knows, and added folders
    (files made in a new folder before its watch is set up are found by scanning it)."""

    def __call__(self, change: watchfiles.Change, path: str) -> bool:
        if change == watchfiles.Change.deleted or not super().__call__(change, path):
            return False
        return classify(path) is not None or (
            change == watchfiles.Change.added and os.path.isdir(path))


@dataclass(frozen=True, slots=True)
class Fact:
    """What one file says: the parsed metadata, the text of a crash file, or a core's size."""

    path: str
    kind: FileKind
    size: int
    text: str | None = None
    doc: dict[str, Any] | None = None
    problem: str | None = None


def read_fact(path: str) -> Fact | None:
    """Read one file (on a worker thread); None if it vanished or is not ours."""
    kind = classify(path)
    if kind is None:
        return None
    try:
        size = os.stat(path).st_size
        if kind is FileKind.CORE:
            return Fact(path, kind, size)
        if kind is not FileKind.METADATA:
            # An empty crash.log is the client's faulthandler file with nothing to say.
            return Fact(path, kind, size, text=read_tail(Path(path))) if size else None
        if size > MAX_METADATA:
            return Fact(path, kind, size, problem=f"larger than {MAX_METADATA} bytes")
        doc = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return Fact(path, kind, 0, problem=f"unreadable: {exc}")
    if not isinstance(doc, dict) or not isinstance(doc.get("status"), str):
        return Fact(path, kind, size, problem="not a metadata object with a 'status'")
    return Fact(path, kind, size, doc=doc)


def scan(folder: str) -> list[Fact]:
    """Every indexed file below `folder`, read (on a worker thread)."""
    facts = []
    for root, _, files in os.walk(folder):
        for name in files:
            if classify(name) is not None and (fact := read_fact(os.path.join(root, name))):
                facts.append(fact)
    return facts


# --- applying facts to the registry (on the database thread) -----------------


def owner(store: Store, path: str) -> str | None:
    """The run whose folder holds `path` (the folder itself or one of its parents)."""
    folder = os.path.dirname(path)
    for _ in range(OWNER_DEPTH):
        run_id = store.run_in_dir(folder)
        if run_id is not None:
            return run_id
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return None


def apply_fact(store: Store, fact: Fact, at: float) -> str:
    """File one fact; returns what happened ('imported', 'indexed', 'known', 'orphan')."""
    if fact.problem is not None:
        raise ValueError(f"{fact.path}: {fact.problem}")
    if fact.kind is FileKind.METADATA:
        return import_run(store, fact, at)
    run_id = owner(store, fact.path)
    if run_id is None:
        return "orphan"
    store.put_crash_file(run_id, fact.path, fact.kind.value, fact.size, at)
    if fact.text:
        _enrich_failure(store, run_id, fact)
    return "indexed"


def _enrich_failure(store: Store, run_id: str, fact: Fact) -> None:
    """Give a failure the traceback it lacks; a crash.log turns ProcessExited into a signal."""
    failure = store.failure_row(run_id)
    if failure is None:
        return
    crash = native_crash(os.path.dirname(fact.path)) if fact.kind is FileKind.CRASH_LOG else None
    if crash is not None and failure["failure_class"] == "ProcessExited":
        signal, first_line, text = crash
        record = failure_record(f"Signal:{signal}", f"{failure['message']}: {first_line}",
                                failure["reason"], failure["at"], traceback=text,
                                signal=signal, exit_code=failure["exit_code"])
        store.put_failure(run_id, record)
    elif not failure["traceback"]:
        record = failure_record(failure["failure_class"], failure["message"], failure["reason"],
                                failure["at"], traceback=fact.text, phase=failure["phase"],
                                exit_code=failure["exit_code"], signal=failure["signal"])
        store.put_failure(run_id, record)


_SUCCEEDED = ("succeeded", "success", "successful", "completed", "complete", "finished", "done",
              "ok")
_FAILED_BY_REASON = {"abandoned": State.FAILED_ABANDONED, "timeout": State.FAILED_TIMEOUT,
                     "lost": State.FAILED_LOST}


def imported_state(doc: dict[str, Any]) -> State:
    """A foreign status in our terms; an unfinished one is `lost` (nobody reports it)."""
    status = doc["status"].lower()
    if status in _SUCCEEDED:
        return State.SUCCEEDED
    if status.startswith(("fail", "error", "crash", "abort", "kill", "cancel")):
        return _FAILED_BY_REASON.get(str(doc.get("failure_reason") or "").lower(),
                                     State.FAILED_ABANDONED if "cancel" in status
                                     else State.FAILED_CRASH)
    return State.LOST


def _epoch(value: Any, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return default


def import_run(store: Store, fact: Fact, at: float) -> str:
    """Import a foreign run folder's metadata.json as a run (never twice, never ours)."""
    doc = fact.doc or {}
    folder = os.path.dirname(fact.path)
    run_id = str(doc.get("run_id") or "")
    if not is_valid_run_id(run_id):
        run_id = "imp-" + hashlib.sha1(folder.encode()).hexdigest()[:16]
    if store.run_row(run_id) is not None or store.run_in_dir(folder) is not None:
        return "known"
    state = imported_state(doc)
    start = _epoch(doc.get("start_time"), at)
    end = _epoch(doc.get("end_time"), start + float(doc.get("runtime_sec") or 0)) \
        if state.terminal else None
    experiment = str(doc.get("experiment") or os.path.basename(os.path.dirname(folder)) or "-")
    variation = str(doc.get("variation") or os.path.basename(folder) or "default")
    store.insert("runs", {
        "run_id": run_id, "experiment": experiment[:256], "variation": variation[:256],
        "attempt": store.next_attempt(experiment[:256], variation[:256]),
        "state": State.PENDING.value, "params": json.dumps(doc.get("params") or {}, default=str),
        "tags": json.dumps({"source": SOURCE}), "run_dir": folder, "created_at": start,
    })
    store.record_creation(run_id, start, SOURCE)
    row = store.require_run(run_id)
    store.set_state(row, state, at=end or at, cause="import", source=SOURCE, started_at=start,
                    ended_at=end, lost_at=None if state.terminal else at,
                    last_heartbeat_at=start, lost_grace=None)
    if state.value.startswith("failed"):
        store.put_failure(run_id, failure_record(
            str(doc.get("failure_class") or "Imported"),
            str(doc.get("failure_reason") or doc.get("error") or doc["status"]),
            FailReason.CRASH if state is State.FAILED_CRASH else state.value.split("_")[1],
            end or at, traceback=doc.get("traceback") if isinstance(doc.get("traceback"), str)
            else None))
    return "imported"


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
        return {"imported": self.imported, "indexed": self.indexed, "known": self.known,
                "orphans": self.orphan, "warnings": self.warnings or []}


class Indexer:
    """Scans directories when they are added, follows them with watchfiles, and scans a
    run's folder when the run fails."""

    def __init__(self, registry: Registry, extra_dirs: Iterable[str] = ()) -> None:
        self.registry = registry
        self.extra_dirs = set(extra_dirs)
        self.dirs: set[str] = set()
        self._changed = anyio.Event()
        self._failed_dirs: list[str] = []
        self._failure_seen = anyio.Event()

    async def load(self) -> None:
        """The directories added with `watch`, and those the config names."""
        self.dirs = set(await self.registry.read(lambda s: s.watched_dirs())) | self.extra_dirs

    async def add(self, folder: str) -> Summary:
        """Watch `folder` from now on: scan it once in full, then follow it."""
        await self.registry.submit(lambda s: s.add_watched_dir(folder, time.time()))
        summary = await self.index(await anyio.to_thread.run_sync(scan, folder))
        self.dirs.add(folder)
        self._changed.set()
        return summary

    async def remove(self, folder: str) -> bool:
        removed: bool = await self.registry.submit(lambda s: s.remove_watched_dir(folder))
        self.dirs.discard(folder)
        self._changed.set()
        return removed

    async def index(self, facts: Iterable[Fact]) -> Summary:
        """File every fact; a malformed file is a warning, never an error."""
        summary = Summary(warnings=[])
        pending = []
        for fact in facts:
            if fact.problem is not None:
                assert summary.warnings is not None
                summary.warnings.append(f"{fact.path}: {fact.problem}")
                log.warning("not indexed: %s: %s", fact.path, fact.problem)
                continue
            pending.append(self.registry.submit(partial(apply_fact, fact=fact, at=time.time())))
        for future in pending:
            outcome = await future
            setattr(summary, outcome, getattr(summary, outcome) + 1)
        return summary

    def on_commit(self, result: BatchResult) -> None:
        """A run that just failed gets its folder scanned for crash files."""
        for t in result.effects.transitions:
            row = result.rows.get(t.run_id)
            if t.to_state.value.startswith("failed") and row and row["run_dir"] \
                    and t.source != SOURCE:
                self._failed_dirs.append(row["run_dir"])
                self._failure_seen.set()

    async def follow_failures(self) -> None:
        while True:
            await self._failure_seen.wait()
            self._failure_seen = anyio.Event()
            folders, self._failed_dirs = self._failed_dirs, []
            facts = await anyio.to_thread.run_sync(_scan_folders, folders)
            await self.index(f for f in facts if f.kind is not FileKind.METADATA)

    async def follow_dirs(self) -> None:
        """Follow the watched directories, with a new watcher each time the set changes.

        The new watcher starts before the old one stops, so no change falls in between;
        the first one comes with a full rescan, for what changed while the daemon was
        down (importing is idempotent), started once the watch is in place.
        """
        current: tuple[list[str], anyio.Event] | None = None
        async with anyio.create_task_group() as tg:
            try:
                while True:
                    self._changed = anyio.Event()
                    dirs = sorted(d for d in self.dirs if os.path.isdir(d))
                    if current is None or dirs != current[0]:
                        stop = anyio.Event()
                        if dirs:
                            tg.start_soon(self._follow, dirs, stop)
                            await anyio.sleep(0)  # the new watcher registers its watches now
                        if current is None:
                            tg.start_soon(self._rescan, dirs)
                        else:
                            current[1].set()
                        current = (dirs, stop)
                    await self._changed.wait()
            finally:
                # Cancelling cannot interrupt watchfiles' thread, its stop event can: within
                # 50 ms instead of the 5 s rust timeout (BUG-4).
                if current is not None:
                    current[1].set()

    async def _follow(self, dirs: list[str], stop: anyio.Event) -> None:
        async for changes in watchfiles.awatch(*dirs, watch_filter=CrashFilter(),
                                               stop_event=stop, debounce=200):
            paths = sorted({path for _, path in changes})
            await self.index(await anyio.to_thread.run_sync(_read_all, paths))

    async def _rescan(self, dirs: list[str]) -> None:
        for folder in dirs:
            summary = await self.index(await anyio.to_thread.run_sync(scan, folder))
            log.info("rescanned %s: %d imported, %d crash files indexed", folder,
                     summary.imported, summary.indexed)



def _read_all(paths: list[str]) -> list[Fact]:
    """The facts of changed files, and of everything in new folders."""
    facts = []
    for path in paths:
        if os.path.isdir(path):
            facts += scan(path)
        elif (fact := read_fact(path)) is not None:
            facts.append(fact)
    return facts


def _scan_folders(folders: list[str]) -> list[Fact]:
    """The crash files directly in each folder (a failed run's run_dir)."""
    paths = []
    for folder in dict.fromkeys(folders):
        try:
            # Not metadata.json: follow_failures drops it, so do not read and parse it.
            paths += [e.path for e in os.scandir(folder) if e.is_file()
                      and classify(e.name) not in (None, FileKind.METADATA)]
        except OSError:
            continue
    return _read_all(paths)
