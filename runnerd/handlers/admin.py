"""Looking after the daemon: the crash indexer's folders, pruning old runs, the hooks."""

from __future__ import annotations

import os

from runnerd.handlers.common import bad
from runnerd.handlers.context import Context, Peer, Reply
from runnerd.maintenance import prune
from runnerd_client.protocol import ErrorCode, HookList, Prune, RunnerdError, Unwatch, Watch


async def handle_watch(ctx: Context, peer: Peer, req: Watch) -> Reply:
    path = os.path.normpath(req.path)
    if not os.path.isdir(path):
        raise bad(f"{path} is not a directory")
    try:
        return (await ctx.indexer.add(path)).as_reply()
    except OSError as exc:  # refused (/proc, another user's, anyone may write to it)
        raise RunnerdError(ErrorCode.FORBIDDEN, str(exc)) from None


async def handle_unwatch(ctx: Context, peer: Peer, req: Unwatch) -> Reply:
    path = os.path.normpath(req.path)
    if not await ctx.indexer.remove(path):
        raise bad(f"{path} is not watched")
    return {}


async def handle_prune(ctx: Context, peer: Peer, req: Prune) -> Reply:
    states = tuple(req.states or ())
    run_ids = await prune(ctx.registry, req.before, states, req.dry_run)
    return {"count": len(run_ids), "run_ids": run_ids[:100], "dry_run": req.dry_run}


async def handle_hooks(ctx: Context, peer: Peer, req: HookList) -> Reply:
    """Each hook with its cursor, backlog and last result (`runnerctl hooks`)."""
    last_seq = await ctx.registry.read(lambda store: store.events.last_seq())
    hooks = ctx.hooks.status(last_seq) if ctx.hooks is not None else []
    return {"hooks": hooks, "last_seq": last_seq}
