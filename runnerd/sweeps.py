"""Sweeps as the daemon shows them: the public sweep object, its status, and manifest.json.

The manifest is the daemon's to write, like each run's metadata.json: it changes when a
cell's attempt changes state, whoever caused it (the driver, a death noticed, the
watchdog), so it stays true when the driver itself is killed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import anyio

from runnerd.processes import is_alive
from runnerd.registry import BatchResult, Registry, Store, iso
from runnerd_client.protocol import SweepStatus

log = logging.getLogger(__name__)
DEBOUNCE = 0.2


def status(row: dict[str, Any]) -> str:
    """The stored status, except that a running sweep whose driver is gone is interrupted."""
    if row["status"] == SweepStatus.RUNNING and row["driver_pid"] and \
            not is_alive(row["driver_pid"], row["driver_start"]):
        return SweepStatus.INTERRUPTED.value
    return str(row["status"])


def sweep_object(store: Store, row: dict[str, Any]) -> dict[str, Any]:
    """A sweep without its cells: what `sweep list` and `sweep show` start from."""
    return {
        "sweep_id": row["sweep_id"], "experiment": row["experiment"],
        "failure_policy": row["failure_policy"], "spec": json.loads(row["spec"]),
        "folder": row["folder"], "manifest": str(Path(row["folder"]) / "manifest.json"),
        "status": status(row), "created_at": iso(row["created_at"]),
        "ended_at": iso(row["ended_at"]), "driver_pid": row["driver_pid"],
        "cells_summary": store.cells_summary(row["sweep_id"]),
    }


def manifest(store: Store, sweep_id: str) -> dict[str, Any]:
    """manifest.json of SPEC §8: the sweep, every cell, and the cells summary."""
    doc = sweep_object(store, store.require_sweep(sweep_id))
    summary = doc.pop("cells_summary")
    for key in ("manifest", "driver_pid", "folder"):
        doc.pop(key)
    return {**doc, "cells": store.cells(sweep_id), "cells_summary": summary}


def write_manifest(folder: str, doc: dict[str, Any]) -> None:
    """Replace folder/manifest.json atomically."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".manifest.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path / "manifest.json")


class ManifestWriter:
    """Keeps every changed sweep's manifest current, at most one write per sweep per
    DEBOUNCE seconds, so a thousand cell transitions a second cost a few writes."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._dirty: set[str] = set()
        self._wakeup = asyncio.Event()
        self._lock = asyncio.Lock()

    def on_commit(self, result: BatchResult) -> None:
        if result.sweeps:
            self._dirty |= result.sweeps
            self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            await anyio.sleep(DEBOUNCE)
            self._wakeup.clear()
            dirty, self._dirty = self._dirty, set()
            for sweep_id in dirty:
                await self.flush(sweep_id)

    async def flush(self, sweep_id: str) -> str | None:
        """Write one sweep's manifest now; its path, or None if it could not be written."""
        async with self._lock:
            row, doc = await self.registry.read(
                lambda store: (store.require_sweep(sweep_id), manifest(store, sweep_id)))
            try:
                await anyio.to_thread.run_sync(write_manifest, row["folder"], doc)
            except OSError as exc:
                log.warning("could not write the manifest of sweep %s in %s: %s",
                            sweep_id, row["folder"], exc)
                return None
            return str(Path(row["folder"]) / "manifest.json")
