"""A sweep's record in the daemon, as a turn reads and ends it.

The daemon owns the record (SPEC §8): cells are claimed by the runs that attempt them,
and manifest.json is written by the daemon. A turn only reads its cells, ends itself
(`sweep_end`), and, for attempts that ran elsewhere (Dask), learns their runs from it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runnerd_client import paths
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key
from runnerd_client.protocol import (
    ErrorCode,
    Fail,
    FailReason,
    RunnerdError,
    SweepCells,
    SweepEnd,
    SweepGet,
    SweepStatus,
)
from runnerd_client.sweep_engine import Lookup
from runnerd_client.sweep_model import CellOutcome, Stop, SweepOptions, SweepResult

PAGE = 5000
SETTLE = 15.0  # seconds a turn waits for attempts that ran elsewhere to be recorded ended


@contextmanager
def daemon_connection(socket_path: str | Path | None = None) -> Iterator[Connection]:
    """A direct connection for the sweep's own requests: they need the daemon."""
    conn = Connection(socket_path or paths.socket_path())
    try:
        yield conn
    finally:
        conn.close()


def sweep_cells(
    conn: Connection, sweep_id: str, unfinished: bool = False, after: int = -1
) -> Iterator[dict[str, Any]]:
    """A sweep's cells from the daemon (those past index `after`), a page at a time."""
    while True:
        page = conn.call(SweepCells(sweep=sweep_id, after=after, limit=PAGE, unfinished=unfinished))
        yield from page["cells"]
        if page["next"] is None:
            return
        after = page["next"]


def cell_state(
    conn: Connection, sweep_id: str, index: int, timeout: float = SETTLE
) -> dict[str, Any]:
    """One cell as the registry has it once its latest attempt ended (or at the timeout):
    a worker elsewhere reports its tasks' ends on its own time."""
    deadline = time.monotonic() + timeout
    while True:
        cells = conn.call(SweepCells(sweep=sweep_id, after=index - 1, limit=1))["cells"]
        cell: dict[str, Any] = cells[0] if cells else {}
        if cell.get("state") != "running" or time.monotonic() > deadline:
            return cell
        time.sleep(0.05)


def registry_lookup(sweep_id: str, socket_path: str | Path | None = None) -> Lookup:
    """The engine's view of a cell's latest attempt: its run and failure (with the
    daemon's diagnosis), once it ended."""

    def lookup(index: int) -> tuple[str | None, dict[str, Any] | None]:
        with daemon_connection(socket_path) as conn:
            cell = cell_state(conn, sweep_id, index)
        return cell.get("run_id"), cell.get("failure")

    return lookup


def settle(conn: Connection, sweep_id: str, timeout: float = SETTLE) -> None:
    """Wait (a while) until no cell of the sweep is running: attempts stopped elsewhere
    are recorded ended by their workers, and a sweep ends only when none is live."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not conn.call(SweepGet(sweep=sweep_id))["sweep"]["cells_summary"]["running"]:
            return
        time.sleep(0.05)


def abandon_running(conn: Connection, sweep_id: str, indexes: set[int], why: Stop) -> None:
    """End the running attempts of these cells failed_abandoned, with `why` and its cause,
    for executors that cannot stop an attempt where it runs themselves (Dask)."""
    for cell in sweep_cells(conn, sweep_id):
        if cell["index"] in indexes and cell["state"] == "running":
            try:
                conn.call(
                    Fail(
                        key=new_key(),
                        run_id=cell["run_id"],
                        reason=FailReason.ABANDONED,
                        failure_class=why.failure_class,
                        message=why.message,
                        cause=why.cause,
                        at=time.time(),
                    )
                )
            except RunnerdError as exc:
                if exc.code != ErrorCode.INVALID_TRANSITION:  # it ended meanwhile: fine
                    raise


def end_turn(
    conn: Connection,
    options: SweepOptions,
    outcomes: list[CellOutcome],
    followed: Mapping[int, str | None],
    *,
    interrupted: bool,
) -> SweepResult:
    """End this turn (the daemon writes the manifest first), then complete each outcome
    from the record: its run, failure and attempts. `followed` names, per cell, the run
    its last attempt in this turn followed, to tell whether that attempt made a run."""
    summary = conn.call(SweepGet(sweep=options.sweep_id))["sweep"]["cells_summary"]
    status = (
        SweepStatus.INTERRUPTED
        if interrupted
        else SweepStatus.SUCCEEDED
        if summary["succeeded"] == summary["total"]
        else SweepStatus.FAILED
    )
    stopped = options.fail_fast and any(o.state == "failed" for o in outcomes)
    ended = conn.call(
        SweepEnd(key=new_key(), sweep_id=options.sweep_id, status=status, skip=stopped)
    )
    if outcomes:
        last = max(o.index for o in outcomes)
        complete(
            outcomes,
            followed,
            itertools.takewhile(
                lambda c: c["index"] <= last,
                sweep_cells(conn, options.sweep_id, after=min(o.index for o in outcomes) - 1),
            ),
        )
    stored = conn.call(SweepGet(sweep=options.sweep_id))["sweep"]
    manifest = ended.get("manifest") or stored.get("manifest")
    return SweepResult(
        options.sweep_id,
        sorted(outcomes, key=lambda o: o.index),
        stored["cells_summary"],
        Path(manifest) if manifest else None,
        stored["status"],
    )


def complete(
    outcomes: list[CellOutcome], followed: Mapping[int, str | None], cells: Iterable[dict[str, Any]]
) -> None:
    """Fill each outcome from its cell's record: its name, its attempts, and the run and
    failure of the attempt this turn made. An attempt that ran elsewhere and was cancelled
    (Dask) ends as the record says; cancelled before it made a run, it was never started."""
    by_index = {o.index: o for o in outcomes}
    for cell in cells:
        outcome = by_index.get(cell["index"])
        if outcome is None:
            continue
        outcome.attempts, outcome.recorded_as = cell["attempts"], cell["variation"]
        if outcome.state in ("taken", "skipped"):
            continue
        if outcome.run_id is None:
            if cell["run_id"] == followed.get(outcome.index):  # it made no run
                outcome.state = "skipped" if outcome.state == "abandoned" else outcome.state
                continue
            outcome.run_id = cell["run_id"]
            if outcome.state == "abandoned" and cell["state"] != "running":
                outcome.state = cell["state"]
        if cell["run_id"] == outcome.run_id:
            outcome.failure = cell["failure"]
