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

This module is the writer: the loop that decides when to write what, and compactions. The
node folder and the thread its files are written on: `runnerd.mirror_files`; what it reads
from the registry: `runnerd.mirror_reads`; the changed runs waiting, and the lag `status`
reports: `runnerd.mirror_backlog`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from runnerd import __version__
from runnerd.mirror_backlog import Backlog, Mark
from runnerd.mirror_files import Disk, NodeFiles, candidates
from runnerd.mirror_format import FORMAT, encode_line
from runnerd.mirror_reads import (
    active,
    anchor,
    details,
    events_after,
    last_seq,
    same_registry,
    snapshot_page,
)
from runnerd.registry import Registry, iso
from runnerd_client.protocol import RunnerdError

log = logging.getLogger(__name__)
INTERVAL = 1.0  # at most one write this often, so a change lands within about this long
PAGE = 500  # runs read and written at a time
HEARTBEAT = 30.0  # node.json rewritten (and running runs re-read) at least this often
FLUSH_TIMEOUT = 10.0  # on SIGTERM; a job's walltime kill leaves about 30 s
COMPACT_MIN = 16 << 20  # journal bytes before a compaction is considered
EVENTS_PAGE = 5000


@dataclass
class Snapshot:
    """A compaction under way: how far it got, and the runs appended meanwhile to the
    segments it replaces (written again once it is in place)."""

    start_seq: int
    after: str | None = None
    meanwhile: dict[str, Mark] = field(default_factory=dict)


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
        self.backlog = Backlog()
        self._compact = False  # a compaction is due
        self._snapshot: Snapshot | None = None  # a compaction under way
        self._stopping = False
        self._wakeup = asyncio.Event()
        self._lock = asyncio.Lock()

    # --- the change feed (on the event loop, after each commit) ---

    def on_commit(self, result: Any) -> None:
        now = time.monotonic()
        for event in result.effects.events:
            self.backlog.mark(event["run_id"], event["seq"], now)
        if result.effects.events:
            self._wakeup.set()

    # --- the refresh loop ---

    async def run(self) -> None:
        """Find (or make) this registry's folder and catch up, then refresh as runs change."""
        await self._until_located()
        beat = time.monotonic() + HEARTBEAT
        while True:
            if not self.backlog.dirty and self.backlog.error is None and self._snapshot is None:
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
                await anyio.sleep(self.backlog.backoff())
            elif len(self.backlog.dirty) < PAGE and self._snapshot is None:
                await anyio.sleep(self.interval)

    async def _until_located(self) -> None:
        while True:
            try:
                async with self._lock:
                    await self._locate()
                return
            except (OSError, RunnerdError) as exc:
                self._failed(exc)
            await anyio.sleep(self.backlog.backoff())

    async def _locate(self) -> None:
        found = await self.disk.run(candidates, self.folder, self.host, self.db)
        for folder, header in found:
            if await self.registry.read(partial(same_registry, header=header)):
                self.node = await self.disk.run(NodeFiles.reopen, folder, header)
                await self._catch_up(header["seq"])
                self.backlog.complete = True
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
            page = await self.registry.read(partial(events_after, seq=seq, limit=EVENTS_PAGE))
            for event_seq, run_id in page:
                self.backlog.mark(run_id, event_seq, now)
            if len(page) < EVENTS_PAGE:
                return
            seq = page[-1][0]

    async def _mark_active(self) -> None:
        """Heartbeats and resources are not events: re-read the active runs now and then."""
        try:
            runs = await self.registry.read(active)
        except RunnerdError:
            return
        now = time.monotonic()
        for run_id in runs:
            self.backlog.mark(run_id, self.backlog.seen_seq, now)

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
                self._snapshot = Snapshot(await self.registry.read(last_seq))
                await self.disk.run(self.node.begin_snapshot)
            if self._snapshot is not None:
                await self._snapshot_step(self._snapshot)
            taken = self.backlog.take(PAGE)
            records = await self.registry.read(partial(details, run_ids=taken))
            await self.disk.run(
                self.node.append, [encode_line(r) for r in records], await self._header()
            )
        except (OSError, RunnerdError) as exc:
            self.backlog.unwrite(self.backlog.writing)
            await self._abort_snapshot()
            self._failed(exc)
            return False
        if self._snapshot is not None:  # the segment it replaces got them: again after it
            self._snapshot.meanwhile.update(self.backlog.writing)
        self.backlog.writing = {}
        self._landed()
        return True

    async def _snapshot_step(self, snapshot: Snapshot) -> None:
        """One page of a compaction: every run of the registry, written whole into the next
        segment, a page per refresh so that changes keep being written meanwhile."""
        assert self.node is not None
        page = await self.registry.read(partial(snapshot_page, after=snapshot.after, limit=PAGE))
        await self.disk.run(self.node.add_to_snapshot, [encode_line(r) for r in page])
        if len(page) == PAGE:
            snapshot.after = page[-1]["run_id"]
            return
        backlog = self.backlog
        complete, backlog.complete = backlog.complete, True
        backlog.seen_seq = max(backlog.seen_seq, snapshot.start_seq)
        backlog.unwrite(snapshot.meanwhile)
        try:
            await self.disk.run(self.node.finish_snapshot, await self._header())
        except OSError:
            backlog.complete = complete
            raise
        self._snapshot = None
        self._compact = False

    async def _abort_snapshot(self) -> None:
        """Drop a compaction under way: the segments it was to replace are still whole."""
        if self._snapshot is not None and self.node is not None:
            self._compact = self._compact or not self.backlog.complete
            self._snapshot = None
            await asyncio.shield(self.disk.run(self.node.abort_snapshot))

    async def _header(self, stopped: bool = False) -> dict[str, Any]:
        assert self.node is not None
        seq = self.backlog.cursor()
        mirrored = await self.registry.read(partial(anchor, seq=seq))
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
            "anchor": mirrored,
            "base": self.node.base,
            "pending": len(self.backlog.dirty),
            "stopped_at": iso(now) if stopped else None,
        }

    def _landed(self) -> None:
        if self.backlog.landed():
            log.info(
                "mirror: %s answers again; catching up (%d run(s) waiting)",
                self.folder,
                len(self.backlog.dirty),
            )

    def _failed(self, exc: BaseException) -> None:
        if self.backlog.failed(exc):
            log.warning(
                "mirror: cannot write to %s: %s; the daemon carries on and the mirror"
                " will catch up",
                self.folder,
                exc,
            )

    # --- shutdown and status ---

    async def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """On SIGTERM: write what is pending and mark the node stopped, for at most
        `timeout` seconds (a hung shared folder must not keep the daemon from exiting)."""
        with anyio.move_on_after(timeout):
            async with self._lock:
                self._stopping = True
                await self._abort_snapshot()
                while self.node is not None and self.backlog.dirty and await self._refresh():
                    pass
                if self.node is not None and not self.backlog.dirty:
                    await self.disk.run(self.node.write_header, await self._header(True))
                    log.info("mirror: flushed to %s", self.node.folder)
                    return
        log.warning(
            "mirror: %d changed run(s) not written to %s before exiting: %s",
            len(self.backlog.dirty) + len(self.backlog.writing),
            self.folder,
            self.backlog.error or f"the folder did not answer within {timeout:g} s",
        )

    def status(self) -> dict[str, Any]:
        """How the mirror is doing, for `runnerctl status`."""
        return {
            "folder": str(self.folder),
            "node": str(self.node.folder) if self.node is not None else None,
            **self.backlog.report(self.disk.busy_since, located=self.node is not None),
        }
