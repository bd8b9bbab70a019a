"""Sweeps and their cells: which attempt each cell's latest is, and what state it is in."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from runnerd.registry.effects import Effects
from runnerd.registry.failures import failure_object
from runnerd.registry.rows import CellRow, NewSweep, SweepRow
from runnerd.registry.schema import FAILURE_COLUMNS, SWEEP_COLUMNS
from runnerd_client.protocol import ErrorCode, RunnerdError, SweepStatus
from runnerd_client.replies import CellInfo

CELL_STATES = ("succeeded", "failed", "abandoned", "skipped", "running", "pending")
# A cell's state, from its latest attempt (r) and its own row (c).
CELL_STATE = (
    "CASE WHEN r.state IS NULL THEN (CASE WHEN c.skipped THEN 'skipped' ELSE 'pending' END)"
    " WHEN r.state = 'succeeded' THEN 'succeeded'"
    " WHEN r.state = 'failed_abandoned' THEN 'abandoned'"
    " WHEN r.state LIKE 'failed%' THEN 'failed' ELSE 'running' END"
)
_SELECT = f"SELECT {', '.join(SWEEP_COLUMNS)} FROM sweeps"


class Sweeps:
    def __init__(self, conn: sqlite3.Connection, effects: Effects) -> None:
        self.conn = conn
        self.effects = effects

    def create(self, new: NewSweep, cells: Iterable[tuple[int, str, str]]) -> None:
        """A sweep and its cells: (index, params JSON, variation) each."""
        self.conn.execute(
            "INSERT INTO sweeps (sweep_id, experiment, failure_policy, spec, folder, status,"
            " driver_pid, driver_start, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                new.sweep_id,
                new.experiment,
                new.failure_policy,
                new.spec_json,
                new.folder,
                SweepStatus.RUNNING.value,
                new.driver_pid,
                new.driver_start,
                new.created_at,
            ),
        )
        self.conn.executemany(
            "INSERT INTO sweep_cells (sweep_id, idx, params, variation) VALUES (?, ?, ?, ?)",
            ((new.sweep_id, idx, params, variation) for idx, params, variation in cells),
        )
        self.effects.sweeps.append(new.sweep_id)

    def get(self, sweep_id: str) -> SweepRow | None:
        row = self.conn.execute(f"{_SELECT} WHERE sweep_id = ?", (sweep_id,)).fetchone()
        return SweepRow(*row) if row else None

    def require(self, sweep_id: str) -> SweepRow:
        row = self.get(sweep_id)
        if row is None:
            raise RunnerdError(ErrorCode.UNKNOWN_RUN, f"no sweep {sweep_id!r}")
        return row

    def resolve(self, prefix: str) -> str:
        """The one sweep_id starting with `prefix` (exact match first)."""
        if prefix and self.get(prefix) is not None:
            return prefix
        rows = (
            self.conn.execute(
                "SELECT sweep_id FROM sweeps WHERE sweep_id >= ? AND sweep_id < ? LIMIT 2",
                (prefix, prefix + "\U0010ffff"),
            ).fetchall()
            if prefix
            else []
        )
        if not rows:
            raise RunnerdError(ErrorCode.UNKNOWN_RUN, f"no sweep matches {prefix!r}")
        if len(rows) > 1:
            raise RunnerdError(ErrorCode.BAD_REQUEST, f"{prefix!r} matches more than one sweep")
        return str(rows[0][0])

    def take_over(self, sweep_id: str, driver_pid: int, driver_start: int | None) -> None:
        """The sweep runs again, driven by this process (a resume)."""
        self._update(
            sweep_id,
            status=SweepStatus.RUNNING.value,
            ended_at=None,
            driver_pid=driver_pid,
            driver_start=driver_start,
        )

    def release(self, sweep_id: str) -> None:
        """Its driver is done, but another still runs cells: no driver now."""
        self._update(sweep_id, driver_pid=None, driver_start=None)

    def end(self, sweep_id: str, status: str, at: float) -> None:
        self._update(sweep_id, status=status, ended_at=at, driver_pid=None, driver_start=None)

    def _update(self, sweep_id: str, **values: Any) -> None:
        sets = ", ".join(f"{col} = ?" for col in values)
        self.conn.execute(
            f"UPDATE sweeps SET {sets} WHERE sweep_id = ?", (*values.values(), sweep_id)
        )
        self.effects.sweeps.append(sweep_id)

    def latest(self, limit: int) -> list[SweepRow]:
        """The newest sweeps first."""
        rows = self.conn.execute(f"{_SELECT} ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        return [SweepRow(*r) for r in rows]

    # --- cells ---

    def skip_unattempted(self, sweep_id: str) -> int:
        cur = self.conn.execute(
            "UPDATE sweep_cells SET skipped = 1 WHERE sweep_id = ? AND attempts = 0", (sweep_id,)
        )
        return cur.rowcount

    def cell(self, sweep_id: str, idx: int) -> CellRow:
        row = self.conn.execute(
            "SELECT variation, params, latest_run_id, attempts FROM sweep_cells"
            " WHERE sweep_id = ? AND idx = ?",
            (sweep_id, idx),
        ).fetchone()
        if row is None:
            raise RunnerdError(ErrorCode.BAD_REQUEST, f"sweep {sweep_id} has no cell {idx}")
        return CellRow(*row)

    def claim_cell(self, sweep_id: str, idx: int, run_id: str) -> None:
        self.conn.execute(
            "UPDATE sweep_cells SET latest_run_id = ?, attempts = attempts + 1"
            " WHERE sweep_id = ? AND idx = ?",
            (run_id, sweep_id, idx),
        )

    def cells(
        self, sweep_id: str, *, after: int = -1, limit: int = -1, unfinished: bool = False
    ) -> list[CellInfo]:
        """Cells in index order with their latest attempt's state and failure."""
        rows = self.conn.execute(
            f"SELECT c.idx, c.params, c.variation, c.latest_run_id, c.attempts, {CELL_STATE},"
            f" r.host, {', '.join(f'f.{c}' for c in FAILURE_COLUMNS)}"
            " FROM sweep_cells c LEFT JOIN runs r ON r.run_id = c.latest_run_id"
            " LEFT JOIN failures f ON f.run_id = c.latest_run_id"
            " WHERE c.sweep_id = ? AND c.idx > ?"
            + (" AND r.state IS NOT 'succeeded'" if unfinished else "")
            + " ORDER BY c.idx LIMIT ?",
            (sweep_id, after, limit),
        ).fetchall()
        return [
            CellInfo(
                r[0],
                json.loads(r[1]),
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                failure_object(r[3], r[7:]) if r[7] is not None else None,
            )
            for r in rows
        ]

    def live_cells(self, sweep_id: str) -> int:
        """Cells whose latest attempt is pending or running (a lost one may never return)."""
        return int(
            self.conn.execute(
                "SELECT COUNT(*) FROM sweep_cells c JOIN runs r ON r.run_id = c.latest_run_id"
                " WHERE c.sweep_id = ? AND r.state IN ('pending', 'running')",
                (sweep_id,),
            ).fetchone()[0]
        )

    def summary(self, sweep_id: str) -> dict[str, int]:
        """How many cells are in each state, and in all."""
        summary = dict.fromkeys(CELL_STATES, 0)
        for state, n in self.conn.execute(
            f"SELECT {CELL_STATE} AS s, COUNT(*) FROM sweep_cells c LEFT JOIN runs r"
            " ON r.run_id = c.latest_run_id WHERE c.sweep_id = ? GROUP BY s",
            (sweep_id,),
        ):
            summary[state] = n
        return {"total": sum(summary.values()), **summary}
