"""Hooks on run events: `[[hooks]]` commands run with each event they want, at least once
and in order per run, from a cursor kept beside the registry (see runner.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runnerd.hooks.runner import HookRunner
from runnerd_client.protocol import HookList

if TYPE_CHECKING:
    from runnerd.handlers import Context

__all__ = ["HookRunner", "handle_hooks"]


async def handle_hooks(ctx: Context, peer: object, req: HookList) -> dict[str, Any]:
    """Each hook with its cursor, backlog and last result (`runnerctl hooks`)."""
    last_seq = await ctx.registry.read(lambda store: store.events.last_seq())
    hooks = ctx.hooks.status(last_seq) if ctx.hooks is not None else []
    return {"hooks": hooks, "last_seq": last_seq}
