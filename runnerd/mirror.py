"""The mirror: a daemon's records kept as plain files in a shared folder (NFS, Lustre, GPFS),
so that they outlive a node whose local disk is wiped when its job ends (SPEC §10).

The registry stays on local disk; the mirror only copies it (file layout:
`runnerd.mirror_format`). Every committed event marks its run changed; within `interval`
seconds the changed runs are read from the registry, appended to this registry's segment
(fsync'd), and node.json says how far the mirror got and when. On SIGTERM what is pending
is written before the daemon exits, and node.json says it stopped.

Every file operation runs on one thread of its own (`Disk`). When the shared filesystem is
slow, full or gone, only that thread waits: the daemon serves on, the changed runs pile up
(one entry per run, however often it changes), `status` says how far behind the mirror is
and why, and it catches up when the folder answers again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import anyio

from runnerd import __version__
from runnerd.mirror_format import (
    FORMAT,
    NODE_FILE,
    NotMirrored,
    encode_line,
    read_header,
    segment_name,
    segment_number,
)
from runnerd.registry import Registry, Store, iso
from runnerd_client.protocol import RunnerdError
from runnerd_client.replies import as_map
from runnerd_client.trust import check_own_file, create_file, open_folder

log = logging.getLogger(__name__)
T = TypeVar("T")
INTERVAL = 1.0  # at most one write this often, so a change lands within about this long
PAGE = 500  # runs read and written at a time
HEARTBEAT = 30.0  # node.json rewritten (and running runs re-read) at least this often
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
STALLED_AFTER = 10.0  # a file operation that has not returned in this long is a stall
FLUSH_TIMEOUT = 10.0  # on SIGTERM; a job's walltime kill leaves about 30 s
MAX_CHECKPOINTS = 100  # the newest kept in a mirrored run (a run may have thousands)
COMPACT_MIN = 16 << 20  # journal bytes before a compaction is considered
EVENTS_PAGE = 5000


class Disk:
    """One daemon thread for every file operation on the shared folder, one at a time. The
    daemon awaits it without blocking, and exits without it if it hangs on a dead server."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self.busy_since: float | None = None
        threading.Thread(target=self._work, name="runnerd-mirror", daemon=True).start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        future: Future[T] = Future()
        self._jobs.put((partial(fn, *args), future))
        return await asyncio.wrap_future(future)

    def _work(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            self.busy_since = time.monotonic()
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the awaiting task
                future.set_exception(exc)
            finally:
                self.busy_since = None


def node_prefix(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", host)[:64] + "-"


def candidates(mirror: Path, host: str, db: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Folders this host's daemon with this registry path wrote before, newest first."""
    if not mirror.is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            "the mirror folder does not exist (is the shared filesystem mounted?)",
            str(mirror),
        )
    found = []
    for entry in os.scandir(mirror):
        if (
            entry.name.startswith(node_prefix(host))
            and entry.is_dir(follow_symlinks=False)
            and _ours(entry.stat(follow_symlinks=False))
        ):
            try:
                header = read_header(Path(entry.path))
            except NotMirrored:
                continue
            if header.get("host") == host and header.get("db") == str(db):
                found.append((Path(entry.path), header))
    return sorted(found, key=lambda f: str(f[1].get("started_at")), reverse=True)


def _ours(info: os.stat_result) -> bool:
    """A node folder this user made and nobody else can write to (the shared folder may be
    writable by others: a folder planted there is not carried on)."""
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class NodeFiles:
    """This registry's folder in the mirror; used only on the Disk thread."""

    def __init__(self, folder: Path, base: int, segment: int) -> None:
        self.folder = folder
        self.base = base
        self.segment = segment
        self.base_bytes = self._size(base)
        self.journal = sum(self._size(n) for n in range(base + 1, segment + 1))
        self.torn = _ends_torn(folder / segment_name(segment))
        self._snapshot: tuple[int, str, int] | None = None  # (number, temp name, fd)

    @classmethod
    def create(cls, mirror: Path, host: str) -> NodeFiles:
        if not mirror.is_dir():
            raise FileNotFoundError(
                errno.ENOENT,
                "the mirror folder does not exist (is the shared filesystem mounted?)",
                str(mirror),
            )
        folder = mirror / f"{node_prefix(host)}{secrets.token_hex(4)}"
        folder.mkdir(mode=0o700)
        return cls(folder, base=0, segment=0)  # its first snapshot is segment 1

    @classmethod
    def reopen(cls, folder: Path, header: dict[str, Any]) -> NodeFiles:
        numbers = [
            n
            for name in os.listdir(folder)
            if (n := segment_number(name)) is not None and n >= header["base"]
        ]
        return cls(folder, header["base"], max(numbers, default=header["base"]))

    def _size(self, number: int) -> int:
        try:
            return (self.folder / segment_name(number)).stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, lines: list[bytes], header: dict[str, Any]) -> None:
        """Append the lines to the current segment (fsync'd), then replace node.json."""
        if lines:
            data = b"\n" * self.torn + b"".join(lines)  # end a torn line first
            with open_folder(self.folder) as dir_fd:
                try:
                    _append(dir_fd, segment_name(self.segment), data)
                except TornWrite:
                    self.torn = True
                    raise
            self.torn = False
            self.journal += len(data)
        self.write_header(header)

    def write_header(self, header: dict[str, Any]) -> None:
        with open_folder(self.folder) as dir_fd:
            _replace(dir_fd, NODE_FILE, encode_line(header))

    def begin_snapshot(self) -> None:
        """Start writing every record whole into the next segment, under a temporary name."""
        self.abort_snapshot()
        number = self.segment + 1
        temp = f".{segment_name(number)}.{secrets.token_hex(4)}.partial"
        with open_folder(self.folder) as dir_fd:
            self._snapshot = (number, temp, create_file(dir_fd, temp, mode=0o600))

    def add_to_snapshot(self, lines: list[bytes]) -> None:
        assert self._snapshot is not None
        _write_all(self._snapshot[2], b"".join(lines))

    def finish_snapshot(self, header: dict[str, Any]) -> None:
        """Rename the snapshot into place, name it the base in node.json, drop the older."""
        assert self._snapshot is not None
        number, temp, fd = self._snapshot
        os.fsync(fd)
        with open_folder(self.folder) as dir_fd:
            os.replace(temp, segment_name(number), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.close(fd)
            self._snapshot = None
            old = range(self.base, self.segment + 1)
            self.base = self.segment = number
            self.base_bytes, self.journal = self._size(number), 0
            _replace(dir_fd, NODE_FILE, encode_line({**header, "base": number}))
            for n in old:
                try:
                    os.unlink(segment_name(n), dir_fd=dir_fd)
                except FileNotFoundError:
                    pass

    def abort_snapshot(self) -> None:
        if self._snapshot is None:
            return
        _, temp, fd = self._snapshot
        self._snapshot = None
        os.close(fd)
        try:
            os.unlink(self.folder / temp)
        except OSError:
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class TornWrite(OSError):
    """A write failed half-way and could not be cut back off: the file ends mid-line."""


def _append(dir_fd: int, name: str, data: bytes) -> None:
    """Append `data` and fsync it. A failed write is cut back off, so that the next append
    never continues half a line (TornWrite if even that failed)."""
    fd = os.open(
        name,
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        info = os.fstat(fd)
        check_own_file(info, name)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, info.st_size)
            except OSError:
                raise TornWrite(exc.errno, exc.strerror, exc.filename) from exc
            raise
    finally:
        os.close(fd)


def _ends_torn(path: Path) -> bool:
    """Whether a segment's last line was cut short (its writer died mid-line)."""
    try:
        with path.open("rb") as file:
            if file.seek(0, os.SEEK_END) == 0:
                return False
            file.seek(-1, os.SEEK_END)
            return file.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _replace(dir_fd: int, name: str, data: bytes) -> None:
    """Write `name` whole under a temporary name, fsync it, then rename it into place."""
    temp = f".{name}.{secrets.token_hex(4)}.tmp"
    fd = create_file(dir_fd, temp, mode=0o600)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


# --- reads on the registry's reading thread ---------------------------------------------


def _details(store: Store, run_ids: list[str]) -> list[dict[str, Any]]:
    """The records to write (as `show --json`); a run pruned since it changed is skipped."""
    records = []
    for run_id in run_ids:
        try:
            record = as_map(store.views.run_details(run_id))
        except RunnerdError:
            continue
        del record["checkpoints"][:-MAX_CHECKPOINTS]
        records.append(record)
    return records


def _snapshot_page(store: Store, after: str | None) -> list[dict[str, Any]]:
    return _details(store, [r.run_id for r in store.views.export_page("runs", after, PAGE)])


def _anchor(store: Store, seq: int) -> list[Any] | None:
    """What identifies event `seq` of this registry (its run and time)."""
    events = store.events.after(seq - 1, None, None, None, 1) if seq else []
    if not events or events[0]["seq"] != seq:
        return None
    return [events[0]["run_id"], events[0]["at"]]


def _same_registry(store: Store, header: dict[str, Any]) -> bool:
    """Whether this registry is the one a node folder mirrors: the event it last mirrored
    is still this registry's. A registry made anew (the node's disk wiped) is behind it."""
    seq = header.get("seq")
    if not isinstance(seq, int) or seq <= 0:
        return True  # nothing mirrored yet: any registry may carry on
    anchor = _anchor(store, seq)
    if anchor is not None:
        return anchor == header.get("anchor")
    return store.events.last_seq() >= seq  # that event was pruned


def _events_after(store: Store, seq: int) -> list[tuple[int, str | None]]:
    return [(e["seq"], e["run_id"]) for e in store.events.after(seq, None, None, None, EVENTS_PAGE)]


def _last_seq(store: Store) -> int:
    return store.events.last_seq()


def _active(store: Store) -> list[str]:
    return [r.run_id for r in store.views.active_runs(10_000)]


@dataclass
class Snapshot:
    """A compaction under way: how far it got, and the runs appended meanwhile to the
    segments it replaces (written again once it is in place)."""

    start_seq: int
    after: str | None = None
    meanwhile: dict[str, tuple[int, float]] = field(default_factory=dict)


class Mirror:
    """Keeps one registry's records current in the shared folder `folder`."""

    def __init__(
        self,
        folder: Path,
        registry: Registry,
        *,
        db: Path,
        socket_path: Path,
        interval: float = INTERVAL,
        host: str | None = None,
    ) -> None:
        self.folder = folder
        self.registry = registry
        self.db, self.socket_path = db, socket_path
        self.interval = interval
        self.host = host or socket.gethostname()
        self.disk = Disk()
        self.node: NodeFiles | None = None
        self.started_at = time.time()
        self.refreshed_at: float | None = None
        self.error: str | None = None
        self.failing_since: float | None = None
        self._dirty: dict[str, tuple[int, float]] = {}  # run_id -> (first seq, when)
        self._writing: dict[str, tuple[int, float]] = {}  # taken from _dirty, not landed
        self._seen_seq = 0
        self._complete = False  # the folder holds every run up to the cursor
        self._compact = False  # a compaction is due
        self._snapshot: Snapshot | None = None  # a compaction under way
        self._stopping = False
        self._wakeup = asyncio.Event()
        self._lock = asyncio.Lock()

    # --- the change feed (on the event loop, after each commit) ---

    def on_commit(self, result: Any) -> None:
        now = time.monotonic()
        for event in result.effects.events:
            self._mark(event["run_id"], event["seq"], now)
        if result.effects.events:
            self._wakeup.set()

    def _mark(self, run_id: str | None, seq: int, now: float) -> None:
        self._seen_seq = max(self._seen_seq, seq)
        if run_id and run_id not in self._dirty:
            self._dirty[run_id] = (seq, now)

    # --- the refresh loop ---

    async def run(self) -> None:
        """Find (or make) this registry's folder and catch up, then refresh as runs change."""
        await self._until_located()
        beat = time.monotonic() + HEARTBEAT
        while True:
            if not self._dirty and self.error is None and self._snapshot is None:
                with anyio.move_on_after(max(0.0, beat - time.monotonic())):
                    await self._wakeup.wait()
            self._wakeup.clear()
            if time.monotonic() >= beat:
                await self._mark_active()
                beat = time.monotonic() + HEARTBEAT
            async with self._lock:
                if self._stopping:
                    return
                landed = await self._refresh()
            if not landed:
                await anyio.sleep(self._backoff())
            elif len(self._dirty) < PAGE and self._snapshot is None:
                await anyio.sleep(self.interval)

    async def _until_located(self) -> None:
        while True:
            try:
                async with self._lock:
                    await self._locate()
                return
            except (OSError, RunnerdError) as exc:
                self._failed(exc)
            await anyio.sleep(self._backoff())

    async def _locate(self) -> None:
        found = await self.disk.run(candidates, self.folder, self.host, self.db)
        for folder, header in found:
            if await self.registry.read(partial(_same_registry, header=header)):
                self.node = await self.disk.run(NodeFiles.reopen, folder, header)
                await self._catch_up(header["seq"])
                self._complete = True
                break
        else:
            self.node = await self.disk.run(NodeFiles.create, self.folder, self.host)
            self._compact = True  # a new folder starts with every run of the registry
        await self.disk.run(self.node.write_header, await self._header())
        log.info("mirroring the registry to %s", self.node.folder)

    async def _catch_up(self, seq: int) -> None:
        """Mark changed what the registry did since the folder was last written."""
        now = time.monotonic()
        while True:
            page = await self.registry.read(partial(_events_after, seq=seq))
            for event_seq, run_id in page:
                self._mark(run_id, event_seq, now)
            if len(page) < EVENTS_PAGE:
                return
            seq = page[-1][0]

    async def _mark_active(self) -> None:
        """Heartbeats and resources are not events: re-read the active runs now and then."""
        try:
            active = await self.registry.read(_active)
        except RunnerdError:
            return
        now = time.monotonic()
        for run_id in active:
            self._mark(run_id, self._seen_seq, now)

    async def _refresh(self) -> bool:
        """Write one page of changed runs and node.json (and a page of a compaction under
        way); False if that failed."""
        assert self.node is not None
        try:
            if (
                self._snapshot is None
                and not self._stopping
                and (
                    self._compact or self.node.journal > max(COMPACT_MIN, 2 * self.node.base_bytes)
                )
            ):
                self._snapshot = Snapshot(await self.registry.read(_last_seq))
                await self.disk.run(self.node.begin_snapshot)
            if self._snapshot is not None:
                await self._snapshot_step(self._snapshot)
            self._writing = {
                run_id: self._dirty.pop(run_id) for run_id in list(islice(self._dirty, PAGE))
            }
            records = await self.registry.read(partial(_details, run_ids=list(self._writing)))
            await self.disk.run(
                self.node.append, [encode_line(r) for r in records], await self._header()
            )
        except (OSError, RunnerdError) as exc:
            self._unwrite(self._writing)
            await self._abort_snapshot()
            self._failed(exc)
            return False
        if self._snapshot is not None:  # the segment it replaces got them: again after it
            self._snapshot.meanwhile.update(self._writing)
        self._writing = {}
        self._landed()
        return True

    def _unwrite(self, taken: dict[str, tuple[int, float]]) -> None:
        """Mark runs changed again (keeping their first change)."""
        for run_id, mark in taken.items():
            self._dirty[run_id] = min(mark, self._dirty.get(run_id, mark))
        self._writing = {}

    async def _snapshot_step(self, snapshot: Snapshot) -> None:
        """One page of a compaction: every run of the registry, written whole into the next
        segment, a page per refresh so that changes keep being written meanwhile."""
        assert self.node is not None
        page = await self.registry.read(partial(_snapshot_page, after=snapshot.after))
        await self.disk.run(self.node.add_to_snapshot, [encode_line(r) for r in page])
        if len(page) == PAGE:
            snapshot.after = page[-1]["run_id"]
            return
        complete, self._complete = self._complete, True
        self._seen_seq = max(self._seen_seq, snapshot.start_seq)
        self._unwrite(snapshot.meanwhile)
        try:
            await self.disk.run(self.node.finish_snapshot, await self._header())
        except OSError:
            self._complete = complete
            raise
        self._snapshot = None
        self._compact = False

    async def _abort_snapshot(self) -> None:
        """Drop a compaction under way: the segments it was to replace are still whole."""
        if self._snapshot is not None and self.node is not None:
            self._compact = self._compact or not self._complete
            self._snapshot = None
            await asyncio.shield(self.disk.run(self.node.abort_snapshot))

    def _cursor(self) -> int:
        """The last event seq whose run is in the folder (to catch up from after a restart)."""
        if not self._complete:
            return 0
        if self._dirty:
            return min(seq for seq, _ in self._dirty.values()) - 1
        return self._seen_seq

    async def _header(self, stopped: bool = False) -> dict[str, Any]:
        assert self.node is not None
        seq = self._cursor()
        anchor = await self.registry.read(partial(_anchor, seq=seq))
        now = time.time()
        return {
            "format": FORMAT,
            "host": self.host,
            "node": self.node.folder.name,
            "socket": str(self.socket_path),
            "db": str(self.db),
            "pid": os.getpid(),
            "version": __version__,
            "started_at": iso(self.started_at),
            "refreshed_at": iso(now),
            "interval": self.interval,
            "heartbeat": HEARTBEAT,
            "seq": seq,
            "anchor": anchor,
            "base": self.node.base,
            "pending": len(self._dirty),
            "stopped_at": iso(now) if stopped else None,
        }

    def _landed(self) -> None:
        if self.error is not None:
            log.info(
                "mirror: %s answers again; catching up (%d run(s) waiting)",
                self.folder,
                len(self._dirty),
            )
        self.refreshed_at = time.time()
        self.error = self.failing_since = None

    def _failed(self, exc: BaseException) -> None:
        text = str(exc)
        if self.error is None:
            log.warning(
                "mirror: cannot write to %s: %s; the daemon carries on and the mirror"
                " will catch up",
                self.folder,
                text,
            )
            self.failing_since = time.time()
        self.error = text

    def _backoff(self) -> float:
        if self.failing_since is None:
            return RETRY_FIRST
        return min(RETRY_MAX, max(RETRY_FIRST, (time.time() - self.failing_since) / 4))

    # --- shutdown and status ---

    async def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """On SIGTERM: write what is pending and mark the node stopped, for at most
        `timeout` seconds (a hung shared folder must not keep the daemon from exiting)."""
        with anyio.move_on_after(timeout):
            async with self._lock:
                self._stopping = True
                await self._abort_snapshot()
                while self.node is not None and self._dirty and await self._refresh():
                    pass
                if self.node is not None and not self._dirty:
                    await self.disk.run(self.node.write_header, await self._header(True))
                    log.info("mirror: flushed to %s", self.node.folder)
                    return
        log.warning(
            "mirror: %d changed run(s) not written to %s before exiting: %s",
            len(self._dirty) + len(self._writing),
            self.folder,
            self.error or f"the folder did not answer within {timeout:g} s",
        )

    def status(self) -> dict[str, Any]:
        """How the mirror is doing, for `runnerctl status`."""
        now = time.monotonic()
        busy = self.disk.busy_since
        waiting = [*self._dirty.values(), *self._writing.values()]
        oldest = min((when for _, when in waiting), default=None)
        if busy is not None and now - busy > STALLED_AFTER:
            state = "stalled"
        elif self.error is not None:
            state = "behind"
        else:
            state = "ok" if self.node is not None else "starting"
        return {
            "folder": str(self.folder),
            "node": str(self.node.folder) if self.node is not None else None,
            "state": state,
            "refreshed_at": iso(self.refreshed_at),
            "pending": len(waiting),
            "oldest_pending_sec": round(now - oldest, 3) if oldest is not None else None,
            "error": self.error,
            "failing_since": iso(self.failing_since),
            "writing_for_sec": round(now - busy, 3) if busy is not None else None,
        }
