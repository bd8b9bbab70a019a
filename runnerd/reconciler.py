"""Start-up recovery: no run is left active with its processes gone, and timers are re-armed."""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from runnerd.handlers import HANDLERS, Context, Peer, hash_and_record
from runnerd.processes import ProcessWatcher, exit_failure, is_alive
from runnerd.registry import RunRow, Store
from runnerd.states import Event, end_with_failure, failure_record
from runnerd.watchdog import Watchdog, next_due
from runnerd_client import paths, procinfo
from runnerd_client.protocol import Artifact, ErrorCode, FailReason, RunnerdError
from runnerd_client.spool import claim_orphans, parse, read_header

log = logging.getLogger(__name__)
SOURCE = "reconciler"

LivePid = tuple[str, int, int | None]


@dataclass
class Reconciled:
    """What start-up found: processes still alive to watch again (run_id, pid, start
    time), and how many runs it ended, interrupted or crashed."""

    live: list[LivePid] = field(default_factory=list)
    interrupted: int = 0
    crashed: int = 0

    def said(self) -> str:
        """What it did, for the start-up log line: `marked 4 runs interrupted`."""
        ended = [f"{n} run{'s' * (n != 1)} {what}" for n, what in (
            (self.interrupted, "interrupted"),
            (self.crashed, "crashed while runnerd was down")) if n]
        return "marked " + " and ".join(ended) if ended else "ended no run"


def reconcile(store: Store, now: float) -> Reconciled:
    """Fail active runs whose every attached process died while the daemon was down; the
    processes still alive, to watch again."""
    found = Reconciled()
    for row in store.runs.active():
        run_id = row.run_id
        records = store.attachments.pid_records(run_id)
        live = [(pid, start) for pid, start in records if is_alive(pid, start)]
        if records and not live:
            if _fail_gone(store, row, now):
                found.interrupted += 1
            else:
                found.crashed += 1
            continue
        for pid, start in records:
            if (pid, start) not in live:
                store.attachments.remove_pid(run_id, pid)
        found.live += [(run_id, pid, start) for pid, start in live]
    return found


def _fail_gone(store: Store, row: RunRow, now: float) -> bool:
    """A run whose processes are gone at start-up. If they were attached in this boot they
    died on their own while runnerd was down: crashed (crash.log says how, if it can).
    Otherwise the machine went down under them: interrupted (and worth resuming); True."""
    boots = store.attachments.pid_boots(row.run_id)
    pids = ", ".join(str(pid) for pid, _ in boots)
    record = exit_failure(row.run_dir, pids, "exited while runnerd was down", now)
    current = procinfo.boot_id()
    if record.failure_class != "ProcessExited" or \
            current is not None and all(boot == current for _, boot in boots):
        end_with_failure(store, row, Event.PROCESS_EXITED, record, SOURCE)
        return False
    record = failure_record(
        "Interrupted", f"process {pids} was running when the machine went down"
        " (it was started before the last boot)", FailReason.ABANDONED, now)
    end_with_failure(store, row, Event.INTERRUPTED, record, SOURCE)
    return True


def _spool_peer(header: dict[str, Any]) -> Peer:
    """The process that wrote a spool. Its pid counts only with a start time to check it by,
    and, if a process lives under that pid and start time, only if it is one of ours: a
    spool names a process the daemon may watch and signal."""
    pid, start = header.get("pid"), header.get("start_time")
    nobody = Peer(pid=0, uid=os.getuid(), start_time=None)
    if type(pid) is not int or type(start) is not int or pid <= 0:
        return nobody
    if procinfo.start_time(pid) == start and procinfo.owner_uid(pid) != os.getuid():
        log.warning("a spool names pid %d, a process of another user: not believed", pid)
        return nobody
    return Peer(pid=pid, uid=os.getuid(), start_time=start)


async def replay_spool(ctx: Context, data: bytes) -> int:
    """Apply a dead client's spooled events in order, as that client; return how many.
    Raises `unavailable` if the registry could not store one (disk full, say): the spool
    must then be kept, and replayed again (idempotently) later.

    Every event is queued before any is committed, so nothing the daemon does in
    reaction to the first commit (a dead pid noticed) can come between them. Artifacts,
    whose hashing may take long, are recorded once hashed, in the background.
    """
    try:
        peer = _spool_peer(read_header(data))
    except (RunnerdError, struct.error, TypeError, ValueError):
        log.warning("a spool without a readable header is skipped")
        return 0
    reqs = [req for req, _ in parse(data) if req is not None and req.mutating]
    queued: list[Awaitable[Any]] = []
    for req in reqs:
        if isinstance(req, Artifact):
            await _hash_later(ctx, req)
            continue
        try:
            queued.append(HANDLERS[type(req)](ctx, peer, req))
        except RunnerdError as exc:
            log.warning("spooled %s refused: %s", req.op, exc)
    unstored: RunnerdError | None = None
    for pending in queued:
        try:
            await pending
        except RunnerdError as exc:
            if exc.code == ErrorCode.UNAVAILABLE:
                unstored = exc
            else:
                log.warning("spooled event refused: %s", exc)
    if unstored is not None:
        raise unstored
    return len(reqs)


async def _hash_later(ctx: Context, req: Artifact) -> None:
    if ctx.spooled_artifacts is not None:
        await ctx.spooled_artifacts.send(req)
    else:
        await _record_spooled_artifact(ctx, req)


async def _record_spooled_artifact(ctx: Context, req: Artifact) -> None:
    try:
        await hash_and_record(ctx, req)
    except RunnerdError as exc:
        log.warning("spooled artifact refused: %s", exc)


async def hash_spooled_artifacts(ctx: Context,
                                 stream: MemoryObjectReceiveStream[Artifact]) -> None:
    """Record replayed artifacts one at a time, as they are hashed, while the daemon serves."""
    async with stream:
        async for req in stream:
            await _record_spooled_artifact(ctx, req)


def spool_folders(ctx: Context) -> list[Path]:
    """Every folder a client of this daemon may have spooled to."""
    return paths.spool_dirs(ctx.config.db, ctx.config.socket)


async def replay_orphan_spools(ctx: Context, pid: int | None = None) -> int:
    """Replay the spools of clients that exited while the daemon was away (or of the one
    process `pid` that just died), then delete them; how many events they held."""
    total = 0
    for path, fd in claim_orphans(spool_folders(ctx), pid):
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read()
        try:
            count = await replay_spool(ctx, data)
        except RunnerdError as exc:
            log.warning("keeping %s to replay later: %s", path.name, exc)
            continue
        path.unlink()
        total += count
        log.info("replayed %d events from %s", count, path.name)
    return total


def spool_replayer(ctx: Context) -> Callable[[int], Awaitable[None]]:
    """What death detection calls first: a dead process's spooled events happened before its
    death, so they are applied before the run is judged crashed."""
    async def replay(pid: int) -> None:
        await replay_orphan_spools(ctx, pid)
    return replay


async def sweep_orphan_spools(ctx: Context, interval: float) -> None:
    """Now and then, replay spools whose clients exited while the daemon was unreachable."""
    while True:
        await anyio.sleep(interval)
        await replay_orphan_spools(ctx)


async def recover(ctx: Context, watchdog: Watchdog, watcher: ProcessWatcher) -> None:
    """Replay orphan spools, reconcile, watch live processes again and re-arm every timer."""
    started = time.monotonic()
    registry = ctx.registry
    replayed = await replay_orphan_spools(ctx)
    found = await registry.submit(lambda store: reconcile(store, time.time()))
    for run_id, pid, start in found.live:
        watcher.watch(run_id, pid, start)
    rows = await registry.read(lambda store: store.runs.active())
    for row in rows:
        watchdog.arm(row.run_id, next_due(row))
    log.info("start-up: replayed %d spooled events, %s; recovered %d active runs"
             " (%d live processes) in %.3f s", replayed, found.said(), len(rows),
             len(found.live), time.monotonic() - started)
