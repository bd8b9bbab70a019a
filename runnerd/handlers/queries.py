"""Reads: one run, lists of runs, the daemon's status, failures and export pages."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from runnerd import __version__
from runnerd.handlers.context import Context, Peer, Reply
from runnerd.registry import Store
from runnerd_client.protocol import (
    PROTOCOL_VERSION,
    Export,
    ExportWhat,
    Failures,
    Get,
    GroupBy,
    ListRuns,
    Status,
)
from runnerd_client.replies import DaemonInfo, ListedFailure, RunInfo, StatusInfo, fields_of


async def handle_get(ctx: Context, peer: Peer, req: Get) -> Reply:
    def read(store: Store) -> Reply:
        run_id = store.runs.resolve(req.run)
        reply: Reply = {"run": store.views.run_details(run_id)}
        if req.env:
            reply["env"] = store.runs.launch_env(run_id)
        return reply

    return await ctx.registry.read(read)


async def handle_list(ctx: Context, peer: Peer, req: ListRuns) -> Reply:
    def read(store: Store) -> list[RunInfo]:
        if req.interrupted:
            return store.views.interrupted_runs(req.limit)
        sweep_id = store.sweeps.resolve(req.sweep) if req.sweep is not None else None
        return store.views.list_runs(
            state=req.state,
            experiment=req.experiment,
            since=req.since,
            limit=req.limit,
            sweep_id=sweep_id,
        )

    return {"runs": await ctx.registry.read(read)}


async def handle_status(ctx: Context, peer: Peer, req: Status) -> Reply:
    limit = max(1, min(req.limit, 100))

    def read(
        store: Store,
    ) -> tuple[dict[str, int], list[RunInfo], list[ListedFailure], dict[str, Any] | None]:
        return (
            store.views.counts(),
            store.views.active_runs(limit),
            store.failures.listing(limit=limit),
            store.views.run_ids(req.heard) if req.runs else None,
        )

    counts, active, failures, runs = await ctx.registry.read(read)
    daemon = DaemonInfo(
        version=__version__,
        protocol=PROTOCOL_VERSION,
        pid=os.getpid(),
        uptime_sec=round(time.time() - ctx.started_at, 3),
        socket=str(ctx.config.socket),
        db=str(ctx.config.db),
        db_bytes=_db_size(ctx.config.db),
        clients=ctx.connections,
    )
    body = fields_of(StatusInfo(counts, active, failures, daemon))
    if ctx.mirror is not None:
        body["mirror"] = ctx.mirror.status()
    if runs is not None:
        body["runs"] = runs
    return body


def _db_size(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


GROUP_KEYS = {
    GroupBy.CLASS: "failure_class",
    GroupBy.SIGNATURE: "signature",
    GroupBy.CATEGORY: "category",
}


async def handle_failures(ctx: Context, peer: Peer, req: Failures) -> Reply:
    if req.group_by is None:

        def read(store: Store) -> Reply:
            run_id = store.runs.resolve(req.run) if req.run else None
            return {
                "failures": store.failures.listing(
                    since=req.since, experiment=req.experiment, run_id=run_id, limit=req.limit
                )
            }

        return await ctx.registry.read(read)
    key = GROUP_KEYS[GroupBy(req.group_by)]
    return {
        "groups": await ctx.registry.read(
            lambda s: s.failures.groups(
                key, since=req.since, experiment=req.experiment, limit=req.limit
            )
        )
    }


async def handle_export(ctx: Context, peer: Peer, req: Export) -> Reply:
    def read(store: Store) -> tuple[list[Any], str | None]:
        items = store.views.export_page(req.what, req.after, req.limit)
        last = items[-1].run_id if len(items) == req.limit else None
        if req.what == ExportWhat.FAILURES:
            return [{**fields_of(item), "details": _details(store, item)} for item in items], last
        if req.env:
            return [
                {**fields_of(item), "env": store.runs.launch_env(item.run_id)} for item in items
            ], last
        return list(items), last

    items, last = await ctx.registry.read(read)
    return {"items": items, "next": last}


def _details(store: Store, failure: Any) -> dict[str, Any]:
    """What the failure's run knows of where it failed, in the terms other systems' failure
    logs use: the task (a Dask key, else the run), the worker (a Dask worker's address, else
    the host) and the phase (the failure's own, else the state the run failed in)."""
    row = store.runs.get(failure.run_id)
    tags = row.tags() if row is not None else {}
    before = store.runs.last_transition(failure.run_id)
    return {
        "task_id": tags.get("dask_key") or failure.run_id,
        "worker_id": tags.get("worker") or (row.host if row is not None else None),
        "phase": failure.phase or (before[0] if before else None),
    }
