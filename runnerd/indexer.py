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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import anyio
import watchfiles

from runnerd.crashfiles import CRASH_LOG, MAX_READ, crash_signal, open_untrusted, tail
from runnerd.mounts import mount_of, read_mountinfo
from runnerd.registry import BatchResult, NewRun, Registry, RunUpdate, Store
from runnerd.states import failure_record
from runnerd_client.ids import is_valid_run_id
from runnerd_client.protocol import FailReason, State
from runnerd_client.trust import UntrustedPath, check_own_folder

log = logging.getLogger(__name__)
MAX_METADATA = 1 << 20
MAX_NAME = 256
MAX_STATUS = 64
MAX_MESSAGE = 4096
MAX_DEPTH = 64
MAX_RUNTIME = 1e9  # 31 years: more is a broken file, not a run
LATEST_TIME = 253402300799.0  # 9999-12-31 23:59:59 UTC, the last time a date can show
FOLLOW_RETRY = 5.0
DEBOUNCE_MS = 200
WATCH_OVERLAP = 4 * DEBOUNCE_MS / 1000  # a replaced watcher's last debounce, with margin
SOURCE = "imported"
OWNER_DEPTH = 3
# Reading these never ends (/proc/self/pagemap) or blocks (a FIFO in /dev); none holds runs.
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
    "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs", "autofs",
    "binfmt_misc", "efivarfs", "selinuxfs", "rpc_pipefs", "nsfs",
})
_OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class FileKind(enum.StrEnum):
    """The files the indexer reads (a folder only appears in a warning about it)."""

    METADATA = "metadata"
    CRASH_LOG = "crash_log"
    TRACEBACK = "traceback"
    CORE = "core"
    FOLDER = "folder"


def classify(path: str) -> FileKind | None:
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
            change == watchfiles.Change.added and os.path.isdir(path))


@dataclass(frozen=True, slots=True)
class Fact:
    """What one file says (the checked metadata, the text of a crash file, a core's size),
    or why it was not read."""

    path: str
    kind: FileKind
    size: int
    text: str | None = None
    doc: dict[str, Any] | None = None
    problem: str | None = None


# --- what a foreign metadata.json may say --------------------------------------------


class _Malformed(ValueError):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"'{field}' {why}")


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(doc: dict[str, Any], field: str, limit: int) -> str | None:
    """A text field (a whole number is taken as its digits), cut to `limit` characters."""
    value = doc.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Malformed(field, f"must be a text, not {type(value).__name__} {_brief(value)}")
    text = str(value)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise _Malformed(field, "is not valid Unicode (a lone surrogate escape)") from None
    return text[:limit]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _time(doc: dict[str, Any], field: str) -> float | None:
    """Seconds since the epoch, from a number or an ISO 8601 date, within what a date shows."""
    value = doc.get(field)
    if value is None:
        return None
    seconds = _number(value)
    if isinstance(value, str):
        try:
            seconds = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError):
            seconds = None
    if seconds is None or not 0 <= seconds <= LATEST_TIME:  # NaN fails both
        raise _Malformed(field, "must be a time from 1970 to 9999 (seconds or ISO 8601), "
                                f"not {_brief(value)}")
    return seconds


def _runtime(doc: dict[str, Any]) -> float | None:
    value = doc.get("runtime_sec")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is None or not 0 <= seconds <= MAX_RUNTIME:
        raise _Malformed("runtime_sec", f"must be a number of seconds from 0 to {MAX_RUNTIME:g},"
                                        f" not {_brief(value)}")
    return seconds


def _nesting(value: Any, limit: int) -> int:
    """How deeply lists and maps nest, counted only up to just past `limit`."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_nesting(v, limit - 1) for v in items), default=0)


def _params(doc: dict[str, Any]) -> dict[str, Any]:
    """A JSON object as the protocol takes it: no NaN, not nested past MAX_DEPTH, Unicode."""
    value = doc.get("params")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Malformed("params", f"must be an object, not {type(value).__name__}")
    if _nesting(value, MAX_DEPTH) > MAX_DEPTH:
        raise _Malformed("params", f"nests deeper than {MAX_DEPTH} levels")
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as exc:  # NaN, a lone surrogate
        raise _Malformed("params", f"is not plain JSON: {exc}") from None
    return value


def checked_doc(doc: Any) -> dict[str, Any] | str:
    """The values of a foreign metadata.json that `import_run` uses, checked and cut to
    size; or what is wrong with it, naming the field. Nothing a file says reaches the
    registry unchecked (a NaN time once failed a whole batch of writes)."""
    if not isinstance(doc, dict):
        return f"not a metadata object but a JSON {type(doc).__name__}"
    try:
        status = _text(doc, "status", MAX_STATUS + 1)
        if not status or len(status) > MAX_STATUS:
            raise _Malformed("status", f"must be a text of 1 to {MAX_STATUS} characters, "
                                       f"not {_brief(doc.get('status'))}")
        names = ("run_id", "experiment", "variation", "failure_class")
        checked: dict[str, Any] = {field: _text(doc, field, MAX_NAME) for field in names}
        for field in ("failure_reason", "error"):
            checked[field] = _text(doc, field, MAX_MESSAGE)
        traceback = _text(doc, "traceback", MAX_METADATA)
        checked |= {"status": status, "params": _params(doc),
                    "traceback": traceback[-MAX_READ:] if traceback else None,
                    "start_time": _time(doc, "start_time"), "end_time": _time(doc, "end_time"),
                    "runtime_sec": _runtime(doc)}
        if (checked["start_time"] or 0.0) + (checked["runtime_sec"] or 0.0) > LATEST_TIME:
            raise _Malformed("runtime_sec", "ends the run after the year 9999")
    except _Malformed as exc:
        return str(exc)
    return checked


# --- reading files (on a worker thread) -----------------------------------------------


def shown_path(path: str) -> str:
    """A path as text even when its name is not valid UTF-8 (bytes shown as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_folder_of(path: str) -> None:
    folder = os.path.dirname(path)
    try:
        check_own_folder(os.stat(folder), folder)
    except UntrustedPath as exc:
        raise UntrustedPath(path, f"its folder {shown_path(folder)}: {exc.why}") from None


def _read(path: str, kind: FileKind) -> Fact | None:
    try:
        path.encode()
    except UnicodeEncodeError:
        raise UntrustedPath(path, "its path is not valid UTF-8") from None
    _check_folder_of(path)
    with os.fdopen(open_untrusted(path), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if kind is FileKind.CORE:
            return Fact(path, kind, size)
        if kind is not FileKind.METADATA:
            # An empty crash.log is the client's faulthandler file with nothing to say.
            return Fact(path, kind, size, text=tail(fh, size)) if size else None
        if size > MAX_METADATA:
            return Fact(path, kind, size, problem=f"larger than {MAX_METADATA} bytes")
        doc = checked_doc(json.loads(fh.read(MAX_METADATA + 1)))
    if isinstance(doc, str):
        return Fact(path, kind, size, problem=doc)
    return Fact(path, kind, size, doc=doc)


def read_fact(path: str) -> Fact | None:
    """Read one file; None if it vanished or has nothing to say. A file that is not a
    regular file of ours in a folder of ours, or says something malformed, is a Fact
    with a problem: a warning, never an error."""
    kind = classify(path)
    if kind is None:
        return None
    try:
        return _read(path, kind)
    except FileNotFoundError:
        return None
    except UntrustedPath as exc:
        return Fact(path, kind, 0, problem=f"refused: {exc.why}")
    except Exception as exc:  # whatever a hostile file makes parsing raise: RecursionError...
        return Fact(path, kind, 0, problem=f"unreadable: {type(exc).__name__}: {exc}")


def _entries(folder: str) -> list[os.DirEntry[str]]:
    """The entries of a folder of ours that others cannot write to (UntrustedPath if it is
    not one); the watched folder itself may be reached through a symlink, nothing below."""
    fd = os.open(folder, _OPEN_FOLDER)
    try:
        check_own_folder(os.fstat(fd), folder)
        with os.scandir(fd) as found:
            return list(found)
    finally:
        os.close(fd)


def _folders(folder: str, skipped: list[Fact]) -> Iterator[tuple[str, list[os.DirEntry[str]]]]:
    """`folder` and each folder below it that may be read, with its entries. A folder that
    is not ours, that anyone may write to or that cannot be read is skipped, as a Fact with
    a problem put in `skipped`; a symlink to a folder is not followed."""
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = _entries(current)
        except UntrustedPath as exc:
            skipped.append(Fact(current, FileKind.FOLDER, 0, problem=f"refused: {exc.why}"))
            continue
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                skipped.append(Fact(current, FileKind.FOLDER, 0,
                                    problem=f"cannot read: {exc.strerror or exc}"))
            continue
        yield current, entries
        pending += [os.path.join(current, e.name) for e in entries
                    if classify(e.name) is None and e.is_dir(follow_symlinks=False)]


def scan(folder: str) -> list[Fact]:
    """Every indexed file below `folder`, read; and each folder skipped (`_folders`)."""
    facts: list[Fact] = []
    for current, entries in _folders(folder, facts):
        for entry in entries:
            if classify(entry.name) is not None and \
                    (fact := read_fact(os.path.join(current, entry.name))) is not None:
                facts.append(fact)
    return facts


def skipped_below(dirs: Iterable[str]) -> set[str]:
    """The folders below `dirs` that scanning skips (listing folders, reading no file)."""
    skipped: list[Fact] = []
    for folder in dirs:
        for _ in _folders(folder, skipped):
            pass
    return {fact.path for fact in skipped}


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
                recursive += [e.path for e in entries if e.is_dir(follow_symlinks=False)
                              and e.path not in flat and e.path not in skipped]
        except OSError:
            continue
    return WatchPlan(tuple(sorted(recursive)), tuple(sorted(flat)))


# --- applying facts to the registry (on the database thread) -----------------


def owner(store: Store, path: str) -> str | None:
    """The run whose folder holds `path` (the folder itself or one of its parents)."""
    folder = os.path.dirname(path)
    for _ in range(OWNER_DEPTH):
        run_id = store.indexing.run_in_dir(folder)
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
    store.indexing.put_crash_file(run_id, fact.path, fact.kind.value, fact.size, at)
    if fact.text:
        _enrich_failure(store, run_id, fact)
    return "indexed"


def _enrich_failure(store: Store, run_id: str, fact: Fact) -> None:
    """Give a failure the traceback it lacks; a crash.log turns ProcessExited into a signal."""
    failure = store.failures.get(run_id)
    if failure is None:
        return
    crash = crash_signal(fact.text or "") if fact.kind is FileKind.CRASH_LOG else None
    if crash is not None and failure.failure_class == "ProcessExited":
        signal, first_line = crash
        record = failure_record(f"Signal:{signal}", f"{failure.message}: {first_line}",
                                failure.reason, failure.at, traceback=fact.text,
                                signal=signal, exit_code=failure.exit_code)
        store.failures.put(run_id, record)
    elif not failure.traceback:
        record = failure_record(failure.failure_class, failure.message, failure.reason,
                                failure.at, traceback=fact.text, phase=failure.phase,
                                exit_code=failure.exit_code, signal=failure.signal)
        store.failures.put(run_id, record)


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


def import_run(store: Store, fact: Fact, at: float) -> str:
    """Import a foreign run folder's checked metadata (`checked_doc`) as a run, never
    twice, never one of ours."""
    doc = fact.doc or {}
    folder = os.path.dirname(fact.path)
    run_id = doc["run_id"] or ""
    if not is_valid_run_id(run_id):
        run_id = "imp-" + hashlib.sha1(folder.encode()).hexdigest()[:16]
    if store.runs.get(run_id) is not None or store.indexing.run_in_dir(folder) is not None:
        return "known"
    state = imported_state(doc)
    start = at if doc["start_time"] is None else doc["start_time"]
    end = None
    if state.terminal:
        end = doc["end_time"] if doc["end_time"] is not None else \
            start + (doc["runtime_sec"] or 0.0)
    experiment = doc["experiment"] or os.path.basename(os.path.dirname(folder)) or "-"
    variation = doc["variation"] or os.path.basename(folder) or "default"
    experiment, variation = experiment[:MAX_NAME], variation[:MAX_NAME]
    store.runs.create(NewRun(
        run_id=run_id, experiment=experiment, variation=variation,
        params_json=json.dumps(doc["params"]), tags_json=json.dumps({"source": SOURCE}),
        run_dir=folder, created_at=start), SOURCE)
    row = store.runs.require(run_id)
    store.runs.set_state(row, state, at=end or at, cause="import", source=SOURCE,
                         change=RunUpdate(started_at=start, ended_at=end,
                                          lost_at=None if state.terminal else at,
                                          last_heartbeat_at=start))
    if state.value.startswith("failed"):
        store.failures.put(run_id, failure_record(
            doc["failure_class"] or "Imported",
            doc["failure_reason"] or doc["error"] or doc["status"],
            FailReason.CRASH if state is State.FAILED_CRASH else state.value.split("_")[1],
            end or at, traceback=doc["traceback"]))
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
            pending.append((fact, self.registry.submit(
                partial(apply_fact, fact=fact, at=time.time()))))
        for fact, future in pending:
            try:
                outcome = await future
            except Exception as exc:
                _warn(summary, fact.path, f"not filed: {exc}")
                continue
            setattr(summary, outcome, getattr(summary, outcome) + 1)
        return summary

    def on_commit(self, result: BatchResult) -> None:
        """A run that just failed gets its folder scanned for crash files."""
        for t in result.effects.transitions:
            row = result.rows.get(t.run_id)
            if t.to_state.value.startswith("failed") and row and row.run_dir \
                    and t.source != SOURCE:
                self._failed_dirs.append(row.run_dir)
                self._failure_seen.set()

    async def follow_failures(self) -> None:
        while True:
            await self._failure_seen.wait()
            self._failure_seen = anyio.Event()
            folders, self._failed_dirs = self._failed_dirs, []
            try:
                facts = await anyio.to_thread.run_sync(_scan_folders, folders)
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
                        *dirs, watch_filter=CrashFilter(), stop_event=stop, debounce=DEBOUNCE_MS,
                        recursive=recursive, ignore_permission_denied=True):
                    paths = sorted({path for _, path in changes})
                    await self.index(await anyio.to_thread.run_sync(_read_all, paths))
                    if not recursive and any(os.path.isdir(path) for path in paths):
                        self._changed.set()  # a new folder beside a skipped one: watch it
                return
            except Exception as exc:
                log.warning("following %s failed (%s: %s); following again in %g s",
                            ", ".join(dirs), type(exc).__name__, exc, FOLLOW_RETRY)
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
            log.log(level, "rescanned %s: %d imported, %d crash files indexed, %d warning(s)",
                    folder, summary.imported, summary.indexed, len(summary.warnings or ()))


async def _stop_after_overlap(stop: anyio.Event, stops: list[anyio.Event]) -> None:
    """Stop a replaced watcher once it has passed on what it saw before its successor was
    in place: a stopped watcher drops the changes it holds back for the debounce."""
    await anyio.sleep(WATCH_OVERLAP)
    stop.set()
    stops.remove(stop)


def _below(folder: str, tops: Iterable[str]) -> bool:
    """Whether `folder` is one of `tops` or inside one of them."""
    return any(folder == top or folder.startswith(top.rstrip("/") + "/") for top in tops)


def _warn(summary: Summary, path: str, problem: str) -> None:
    assert summary.warnings is not None
    summary.warnings.append(f"{shown_path(path)}: {problem}")
    log.warning("not indexed: %s: %s", shown_path(path), problem)


def _read_all(paths: list[str]) -> list[Fact]:
    """The facts of changed files, and of everything in new folders (not through a
    symlink)."""
    facts = []
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
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
            paths += [e.path for e in os.scandir(folder) if e.is_file(follow_symlinks=False)
                      and classify(e.name) not in (None, FileKind.METADATA)]
        except OSError:
            continue
    return _read_all(paths)
