"""Start-up recovery: no run is left active with its processes gone, and timers are re-armed."""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import anyio

from runnerd.handlers import HANDLERS, Context, Peer, file_digest, record_artifact
from runnerd.processes import ProcessWatcher, exit_failure, is_alive
from runnerd.registry import Store
from runnerd.states import Event, end_with_failure, failure_record
from runnerd.watchdog import Watchdog, next_due
from runnerd_client.protocol import Artifact, FailReason, Request, RunnerdError
from runnerd_client.spool import claim_orphans, parse, read_header

log = logging.getLogger(__name__)
SOURCE = "reconciler"

LivePid = tuple[str, int, int | None]


def reconcile(store: Store, now: float) -> list[LivePid]:
    """Fail active runs whose every attached process died while the daemon was down.

    Returns the (run_id, pid, start time) of processes still alive, to watch again.
    """
    live_pids: list[LivePid] = []
    for row in store.active_rows():
        run_id = row["run_id"]
        records = store.pid_records(run_id)
        live = [(pid, start) for pid, start in records if is_alive(pid, start)]
        if records and not live:
            _fail_gone(store, row, ", ".join(str(pid) for pid, _ in records), now)
            continue
        for pid, start in records:
            if (pid, start) not in live:
                store.remove_pid(run_id, pid)
        live_pids += [(run_id, pid, start) for pid, start in live]
    return live_pids


def _fail_gone(store: Store, row: dict[str, Any], pids: str, now: float) -> None:
    """A run whose processes are gone at start-up: crashed on its own if crash.log says so,
    else interrupted, gone down with runnerd or the machine (and worth resuming)."""
    record = exit_failure(row["run_dir"], pids, "exited while runnerd was down", now)
    if record["failure_class"] != "ProcessExited":
        end_with_failure(store, row, Event.PROCESS_EXITED, record, SOURCE)
        return
    record = failure_record(
        "Interrupted", f"process {pids} was running when runnerd or the machine went down,"
        " and is gone (it exited while runnerd was down)", FailReason.ABANDONED, now)
    end_with_failure(store, row, Event.INTERRUPTED, record, SOURCE)


def _spool_peer(header: dict[str, Any]) -> Peer:
    """The process that wrote a spool; its pid counts only with a start time to check it by."""
    pid, start = header.get("pid"), header.get("start_time")
    if type(pid) is int and type(start) is int and pid > 0:
        return Peer(pid=pid, uid=os.getuid(), start_time=start)
    return Peer(pid=0, uid=os.getuid(), start_time=None)


def _digests(reqs: list[Request]) -> dict[int, tuple[int, str] | RunnerdError]:
    """Hash every spooled artifact up front (on a worker thread)."""
    out: dict[int, tuple[int, str] | RunnerdError] = {}
    for i, req in enumerate(reqs):
        if isinstance(req, Artifact):
            try:
                out[i] = file_digest(req.path)
            except RunnerdError as exc:
                out[i] = exc
    return out


def _queue(ctx: Context, peer: Peer, req: Request,
           digest: tuple[int, str] | RunnerdError | None) -> Awaitable[Any]:
    if isinstance(digest, RunnerdError):
        raise digest
    if digest is not None:
        return record_artifact(ctx, cast(Artifact, req), digest)
    return HANDLERS[type(req)](ctx, peer, req)


async def replay_spool(ctx: Context, data: bytes) -> int:
    """Apply a dead client's spooled events in order, as that client; return how many.

    Every event is queued before any is committed, so nothing the daemon does in
    reaction to the first commit (a dead pid noticed) can come between them.
    """
    try:
        peer = _spool_peer(read_header(data))
    except (RunnerdError, struct.error, TypeError):
        return 0
    reqs = [req for req, _ in parse(data) if req is not None and req.mutating]
    digests = await anyio.to_thread.run_sync(_digests, reqs)
    queued: list[Awaitable[Any]] = []
    for i, req in enumerate(reqs):
        try:
            queued.append(_queue(ctx, peer, req, digests.get(i)))
        except RunnerdError as exc:
            log.warning("spooled %s refused: %s", req.op, exc)
    for pending in queued:
        try:
            await pending
        except RunnerdError as exc:
            log.warning("spooled event refused: %s", exc)
    return len(queued)


async def replay_orphan_spools(ctx: Context, folder: Path, pid: int | None = None) -> None:
    """Replay the spools of clients that exited while the daemon was away (or of the one
    process `pid` that just died), then delete them."""
    for path, fd in claim_orphans(folder, pid):
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read()
        count = await replay_spool(ctx, data)
        path.unlink()
        log.info("replayed %d events from %s", count, path.name)


def spool_replayer(ctx: Context) -> Callable[[int], Awaitable[None]]:
    """What death detection calls first: a dead process's spooled events happened before its
    death, so they are applied before the run is judged crashed."""
    async def replay(pid: int) -> None:
        await replay_orphan_spools(ctx, ctx.config.db.parent / "spool", pid)
    return replay


async def sweep_orphan_spools(ctx: Context, interval: float) -> None:
    """Now and then, replay spools whose clients exited while the daemon was unreachable."""
    while True:
        await anyio.sleep(interval)
        await replay_orphan_spools(ctx, ctx.config.db.parent / "spool")


async def recover(ctx: Context, watchdog: Watchdog, watcher: ProcessWatcher) -> None:
    """Replay orphan spools, reconcile, watch live processes again and re-arm every timer."""
    started = time.monotonic()
    registry = ctx.registry
    await replay_orphan_spools(ctx, ctx.config.db.parent / "spool")
    live = await registry.submit(lambda store: reconcile(store, time.time()))
    for run_id, pid, start in live:
        watcher.watch(run_id, pid, start)
    rows = await registry.read(lambda store: store.active_rows())
    for row in rows:
        watchdog.arm(row["run_id"], next_due(row))
    log.info("recovered %d active runs (%d live processes) in %.3f s",
             len(rows), len(live), time.monotonic() - started)
