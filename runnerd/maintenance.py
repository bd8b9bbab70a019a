"""Keeping a long-lived registry small: pruning old terminal runs, now or periodically."""

from __future__ import annotations

import logging
import time
from functools import partial

import anyio

from runnerd.registry import Registry, Store

log = logging.getLogger(__name__)
PRUNE_INTERVAL = 3600.0


async def prune(
    registry: Registry, before: float, states: tuple[str, ...] = (), dry_run: bool = False
) -> list[str]:
    """The run ids of terminal runs that ended before `before`, deleted unless a dry run."""
    run_ids: list[str] = await registry.submit(
        lambda store: store.upkeep.prune(before, states, dry_run)
    )
    return run_ids


async def prune_periodically(registry: Registry, retention: float) -> None:
    """Every hour, delete terminal runs that ended more than `retention` seconds ago; a
    prune the disk refused is retried until it lands (nobody else will ask again)."""
    while True:
        pruned = await registry.land(
            partial(_prune_older, cutoff=time.time() - retention),
            f"pruning runs older than {retention:.0f} s",
        )
        if pruned:
            log.info("pruned %d runs older than %.0f s", len(pruned), retention)
        await anyio.sleep(PRUNE_INTERVAL)


def _prune_older(store: Store, cutoff: float) -> list[str]:
    return store.upkeep.prune(cutoff, (), False)
