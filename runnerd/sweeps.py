"""Sweeps as the daemon shows them: the public sweep object, its status, and manifest.json.

The manifest is the daemon's to write, like each run's metadata.json: it changes when a
cell's attempt changes state, whoever caused it (the driver, a death noticed, the
watchdog), so it stays true when the driver itself is killed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from runnerd.processes import is_alive
from runnerd.registry import BatchResult, Registry, Store, SweepRow, iso
from runnerd_client.protocol import SweepStatus
from runnerd_client.replies import CellInfo, SweepInfo, fields_of
from runnerd_client.trust import write_atomically

log = logging.getLogger(__name__)
DEBOUNCE = 0.2


def status(row: SweepRow) -> str:
    """The stored status, except that a running sweep whose driver is gone is interrupted."""
    if (
        row.status == SweepStatus.RUNNING
        and row.driver_pid
        and not is_alive(row.driver_pid, row.driver_start)
    ):
        return SweepStatus.INTERRUPTED.value
    return row.status


def sweep_object(store: Store, row: SweepRow) -> SweepInfo:
    """A sweep without its cells: what `sweep list` and `sweep show` start from."""
    return SweepInfo(
        row.sweep_id,
        row.experiment,
        row.failure_policy,
        json.loads(row.spec_json),
        row.folder,
        str(Path(row.folder) / "manifest.json"),
        status(row),
        iso(row.created_at),
        iso(row.ended_at),
        row.driver_pid,
        store.sweeps.summary(row.sweep_id),
    )


MANIFEST_PAGE = 5000


def manifest_head(store: Store, sweep_id: str) -> dict[str, Any]:
    """manifest.json of SPEC §8 without its cells: the sweep and its cells summary."""
    doc = fields_of(sweep_object(store, store.sweeps.require(sweep_id)))
    for key in ("manifest", "driver_pid"):
        doc.pop(key)
    return doc


def encode(head: dict[str, Any], cells: list[CellInfo]) -> str:
    """The manifest as compact JSON, one cell per line: C-speed to encode (a 100,000-cell
    sweep is a few MB), and still easy to grep."""
    compact = (",", ":")
    lines = ",\n".join(json.dumps(cell, separators=compact, default=fields_of) for cell in cells)
    return f'{json.dumps(head, separators=compact)[:-1]},"cells":[\n{lines}\n]}}\n'


def write_manifest(folder: str, text: str) -> None:
    """Replace folder/manifest.json atomically, never through a symlink planted there."""
    write_atomically(folder, "manifest.json", text.encode())


class ManifestWriter:
    """Keeps every changed sweep's manifest current. Writes are spaced by at least
    DEBOUNCE seconds and twice the last write's time, and cells are read a page at a
    time, so a huge sweep never hogs the registry thread others wait on."""

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
        pause = DEBOUNCE
        while True:
            await self._wakeup.wait()
            await anyio.sleep(pause)
            self._wakeup.clear()
            started = time.monotonic()
            for sweep_id in list(self._dirty):
                await self.flush(sweep_id)
            pause = max(DEBOUNCE, 2 * (time.monotonic() - started))

    async def flush(self, sweep_id: str) -> str | None:
        """Write one sweep's manifest now; its path, or None if it could not be written."""
        async with self._lock:
            self._dirty.discard(sweep_id)
            head = await self.registry.read(partial(manifest_head, sweep_id=sweep_id))
            cells: list[CellInfo] = []
            while True:
                page = await self.registry.read(
                    partial(_cells_page, sweep_id=sweep_id, after=cells[-1].index if cells else -1)
                )
                cells += page
                if len(page) < MANIFEST_PAGE:
                    break
            folder = head.pop("folder")
            try:
                await anyio.to_thread.run_sync(lambda: write_manifest(folder, encode(head, cells)))
            except OSError as exc:
                log.warning(
                    "could not write the manifest of sweep %s in %s: %s", sweep_id, folder, exc
                )
                return None
            return str(Path(folder) / "manifest.json")


def _cells_page(store: Store, sweep_id: str, after: int) -> list[CellInfo]:
    return store.sweeps.cells(sweep_id, after=after, limit=MANIFEST_PAGE)
