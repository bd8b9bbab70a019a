"""Replaying spools: the events a client could not deliver, applied as that client once it
is gone (at start-up, when its process dies, and now and then for clients that exited while
the daemon was unreachable), with their artifacts hashed in the background."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from runnerd.handlers import HANDLERS, Context, Peer, hash_and_record
from runnerd_client import paths, procinfo
from runnerd_client.protocol import Artifact, ErrorCode, RunnerdError
from runnerd_client.spool import claim_orphans, parse, read_header

log = logging.getLogger(__name__)


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


async def hash_spooled_artifacts(ctx: Context, stream: MemoryObjectReceiveStream[Artifact]) -> None:
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


async def sweep_orphan_spools(ctx: Context, interval: float) -> None:
    """Now and then, replay spools whose clients exited while the daemon was unreachable."""
    while True:
        await anyio.sleep(interval)
        await replay_orphan_spools(ctx)
