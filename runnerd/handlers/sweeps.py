"""Sweeps: create one with its cells, a driver taking it over or ending its turn, and reads
of a sweep, its cells and the list of sweeps."""

from __future__ import annotations

import os
from collections.abc import Awaitable
from typing import Any

import anyio

from runnerd import sweeps
from runnerd.handlers.common import as_json, bad, mutate
from runnerd.handlers.context import Context, Peer, Reply
from runnerd.registry import NewSweep, Store
from runnerd_client import paths
from runnerd_client.cells import SpecError, count, expand, variation
from runnerd_client.protocol import (
    ErrorCode,
    RunnerdError,
    SweepCells,
    SweepCreate,
    SweepEnd,
    SweepGet,
    SweepList,
    SweepStart,
    SweepStatus,
)
from runnerd_client.replies import CellInfo, SweepInfo

MAX_CELLS = 1_000_000


def _sweep_cells(spec: dict[str, Any], max_cells: int) -> list[tuple[int, str, str]]:
    """(index, params JSON, variation) of each cell of a spec, refused when malformed."""
    try:
        total = count(spec)
        if not 1 <= total <= max_cells:
            raise bad(f"a sweep has 1 to {max_cells} cells, not {total}")
        return [
            (i, as_json(params, f"cell {i}"), variation(params))
            for i, params in enumerate(expand(spec))
        ]
    except SpecError as exc:
        raise bad(str(exc)) from None


async def handle_sweep_create(ctx: Context, peer: Peer, req: SweepCreate) -> Reply:
    where = (
        os.path.normpath(req.folder)
        if req.folder
        else str(paths.data_dir() / "sweeps" / req.sweep_id)
    )
    spec = as_json(req.spec, "spec")
    cells = await anyio.to_thread.run_sync(_sweep_cells, req.spec, MAX_CELLS)

    def apply(store: Store, at: float) -> Reply:
        if store.sweeps.get(req.sweep_id) is not None:
            raise RunnerdError(ErrorCode.CONFLICT, f"sweep {req.sweep_id} already exists")
        store.sweeps.create(
            NewSweep(
                sweep_id=req.sweep_id,
                experiment=req.experiment,
                failure_policy=req.failure_policy,
                spec_json=spec,
                folder=where,
                driver_pid=peer.pid,
                driver_start=peer.start_time,
                created_at=at,
            ),
            cells,
        )
        return {"sweep_id": req.sweep_id, "folder": where, "cells": len(cells)}

    return await mutate(ctx, req, apply)


def handle_sweep_start(ctx: Context, peer: Peer, req: SweepStart) -> Awaitable[Reply]:
    def apply(store: Store, at: float) -> Reply:
        row = store.sweeps.require(req.sweep_id)
        if sweeps.status(row) == SweepStatus.RUNNING and row.driver_pid not in (None, peer.pid):
            return {"sweep_id": req.sweep_id, "driver_pid": row.driver_pid}  # it helps
        store.sweeps.take_over(req.sweep_id, peer.pid, peer.start_time)
        return {"sweep_id": req.sweep_id, "driver_pid": peer.pid}

    return mutate(ctx, req, apply)


async def handle_sweep_end(ctx: Context, peer: Peer, req: SweepEnd) -> Reply:
    """End the driver's turn; reply once manifest.json shows it."""

    def apply(store: Store, at: float) -> Reply:
        row = store.sweeps.require(req.sweep_id)
        if store.sweeps.live_cells(req.sweep_id):
            # Another driver still runs cells of it: the last one to end ends the sweep.
            if row.driver_pid == peer.pid:
                store.sweeps.release(req.sweep_id)
            return {"sweep_id": req.sweep_id, "skipped": 0, "ended": False}
        skipped = store.sweeps.skip_unattempted(req.sweep_id) if req.skip else 0
        store.sweeps.end(req.sweep_id, req.status, at)
        store.events.log_sweep(
            req.sweep_id,
            row.experiment,
            "sweep_ended",
            at,
            {
                "status": req.status,
                "skipped": skipped,  # for hooks and follow
                "cells": store.sweeps.summary(req.sweep_id),
            },
        )
        return {"sweep_id": req.sweep_id, "skipped": skipped, "ended": True}

    reply = await mutate(ctx, req, apply)
    return {**reply, "manifest": await ctx.manifests.flush(req.sweep_id)}


async def handle_sweep_get(ctx: Context, peer: Peer, req: SweepGet) -> Reply:
    def read(store: Store) -> SweepInfo:
        return sweeps.sweep_object(store, store.sweeps.require(store.sweeps.resolve(req.sweep)))

    return {"sweep": await ctx.registry.read(read)}


async def handle_sweep_cells(ctx: Context, peer: Peer, req: SweepCells) -> Reply:
    def read(store: Store) -> list[CellInfo]:
        return store.sweeps.cells(
            store.sweeps.resolve(req.sweep),
            after=req.after,
            limit=req.limit + 1,
            unfinished=req.unfinished,
        )

    cells = await ctx.registry.read(read)
    more = len(cells) > req.limit
    cells = cells[: req.limit]
    return {"cells": cells, "next": cells[-1].index if more else None}


async def handle_sweep_list(ctx: Context, peer: Peer, req: SweepList) -> Reply:
    return {
        "sweeps": await ctx.registry.read(
            lambda store: [
                sweeps.sweep_object(store, row) for row in store.sweeps.latest(req.limit)
            ]
        )
    }
