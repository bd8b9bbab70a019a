"""The public run objects (SPEC §6) and metadata.json (SPEC §7), made from stored rows."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from runnerd.registry.attachments import Attachments
from runnerd.registry.failures import Failures
from runnerd.registry.rows import RunRow, where
from runnerd.registry.runs import Runs
from runnerd.registry.schema import RUN_COLUMNS
from runnerd.times import iso
from runnerd_client.protocol import ACTIVE_STATES, State
from runnerd_client.replies import (
    ArtifactInfo,
    CheckpointInfo,
    CrashFileInfo,
    ListedFailure,
    RunDetails,
    RunInfo,
    TransitionInfo,
)

_SELECT = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"


class Views:
    def __init__(
        self, conn: sqlite3.Connection, runs: Runs, attachments: Attachments, failures: Failures
    ) -> None:
        self.conn = conn
        self.runs = runs
        self.attachments = attachments
        self.failures = failures

    def run_object(self, row: RunRow) -> RunInfo:
        """The public run object of SPEC §6, built from a runs row."""
        return RunInfo(**self._run_fields(row))

    def _run_fields(self, row: RunRow) -> dict[str, Any]:
        return {
            "run_id": row.run_id,
            "experiment": row.experiment,
            "variation": row.variation,
            "attempt": row.attempt,
            "state": row.state.value,
            "cwd": row.cwd,
            "run_dir": row.run_dir,
            "host": row.host,
            "heartbeats": row.heartbeats,
            "heartbeat_timeout": row.heartbeat_timeout,
            "lost_grace": row.lost_grace,
            "deadline": row.deadline,
            "retry_of": row.retry_of,
            "resumed_from": row.resumed_from,
            "sweep_id": row.sweep_id,
            "cell": row.cell,
            "params": json.loads(row.params_json),
            "launch": json.loads(row.launch_json) if row.launch_json else None,
            "tags": json.loads(row.tags_json),
            "created_at": iso(row.created_at),
            "started_at": iso(row.started_at),
            "ended_at": iso(row.ended_at),
            "last_heartbeat_at": iso(row.last_heartbeat_at),
            "pids": self.attachments.pids(row.run_id),
            "resources": self.attachments.resources(row.run_id),
            "failure": self.failures.public(row.run_id) if row.failed else None,
        }

    def run_details(self, run_id: str) -> RunDetails:
        """A run object with its transitions, artifacts and checkpoints (for `show`)."""
        run = (run_id,)
        transitions = self.conn.execute(
            "SELECT seq, at, from_state, to_state, cause, source FROM transitions"
            " WHERE run_id = ? ORDER BY seq",
            run,
        )
        artifacts = self.conn.execute(
            "SELECT path, size, sha256, at FROM artifacts WHERE run_id = ? ORDER BY at", run
        )
        crash_files = self.conn.execute(
            "SELECT path, kind, size, at FROM crash_files WHERE run_id = ? ORDER BY path", run
        )
        checkpoints = self.conn.execute(
            "SELECT seq, data, path, at FROM checkpoints WHERE run_id = ? ORDER BY seq", run
        )
        return RunDetails(
            **self._run_fields(self.runs.require(run_id)),
            transitions=[
                TransitionInfo(r[0], iso(r[1]), r[2], r[3], r[4], r[5]) for r in transitions
            ],
            artifacts=[ArtifactInfo(r[0], r[1], r[2], iso(r[3])) for r in artifacts],
            crash_files=[CrashFileInfo(r[0], r[1], r[2], iso(r[3])) for r in crash_files],
            checkpoints=[
                CheckpointInfo(r[0], json.loads(r[1]), r[2], iso(r[3])) for r in checkpoints
            ],
        )

    def list_runs(
        self,
        *,
        state: str | None,
        experiment: str | None,
        since: float | None,
        limit: int,
        sweep_id: str | None = None,
    ) -> list[RunInfo]:
        clause, args = where(
            ("state = ?", state),
            ("experiment = ?", experiment),
            ("created_at >= ?", since),
            ("sweep_id = ?", sweep_id),
        )
        rows = self.conn.execute(
            f"{_SELECT} {clause} ORDER BY created_at DESC, run_id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [self.run_object(RunRow.of(r)) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, COUNT(*) FROM runs GROUP BY state").fetchall()
        return {str(state): int(n) for state, n in rows}

    def run_ids(self, heard: bool) -> dict[str, dict[str, str]]:
        """By state, every run's id, and with `heard` when each was last heard of (the
        latest of its created, started, heartbeat and ended times, in milliseconds as its
        run object shows them), each joined by spaces into one text, in the same order:
        what counting the runs of several daemons once each needs, built by SQLite and
        small on the wire. The ids alone come from the state index; their times cost a
        read of every run."""
        if not heard:
            rows = self.conn.execute(
                "SELECT state, group_concat(run_id, ' ') FROM runs GROUP BY state"
            ).fetchall()
            return {str(state): {"ids": ids} for state, ids in rows}
        rows = self.conn.execute(
            "SELECT state, group_concat(run_id, ' '), group_concat(heard, ' ') FROM ("
            " SELECT state, run_id, CAST(round(max(created_at, coalesce(started_at, 0),"
            " coalesce(last_heartbeat_at, 0), coalesce(ended_at, 0)) * 1000000) AS INTEGER)"
            " / 1000 AS heard FROM runs) GROUP BY state"
        ).fetchall()
        return {str(state): {"ids": ids, "heard": times} for state, ids, times in rows}

    def active_runs(self, limit: int) -> list[RunInfo]:
        out: list[RunInfo] = []
        for state in ACTIVE_STATES:
            out += self.list_runs(state=state.value, experiment=None, since=None, limit=limit)
        out.sort(key=lambda r: r.created_at or "", reverse=True)
        return out[:limit]

    def interrupted_runs(self, limit: int) -> list[RunInfo]:
        """Runs the reconciler found interrupted that no later attempt has taken up."""
        rows = self.conn.execute(
            f"SELECT {', '.join('r.' + c for c in RUN_COLUMNS)} FROM failures f"
            " JOIN runs r USING (run_id) WHERE f.failure_class = 'Interrupted'"
            " AND NOT EXISTS (SELECT 1 FROM runs n WHERE n.experiment = r.experiment"
            " AND n.variation = r.variation AND n.attempt > r.attempt)"
            " ORDER BY r.created_at LIMIT ?",
            (limit,),
        ).fetchall()
        return [self.run_object(RunRow.of(r)) for r in rows]

    def export_page(
        self, what: str, after: str | None, limit: int
    ) -> list[RunInfo] | list[ListedFailure]:
        """Runs or failures in run_id order, from just after `after`."""
        if what == "failures":
            return self.failures.page(after, limit)
        rows = self.conn.execute(
            f"{_SELECT} WHERE run_id > ? ORDER BY run_id LIMIT ?",
            (after or "", limit),
        ).fetchall()
        return [self.run_object(RunRow.of(r)) for r in rows]

    def metadata_doc(self, row: RunRow) -> tuple[str, dict[str, Any]] | None:
        """(run_dir, metadata.json content) of SPEC §7, or None without a run_dir."""
        if not row.run_dir:
            return None
        failure = self.failures.get(row.run_id) if row.failed else None
        start, end = row.started_at, row.ended_at
        return row.run_dir, {
            "run_id": row.run_id,
            "experiment": row.experiment,
            "variation": row.variation,
            "attempt": row.attempt,
            "status": notata_status(row.state),
            "state": row.state.value,
            "start_time": iso(start),
            "end_time": iso(end),
            "runtime_sec": round(end - start, 3) if start is not None and end is not None else None,
            "failure_reason": (failure.message or failure.failure_class) if failure else None,
            "failure_class": failure.failure_class if failure else None,
            "category": failure.category if failure else None,
        }


def notata_status(state: State) -> str:
    """notata's `status` (SPEC §7): `complete`, `failed` for every failed_* state, else the
    state, so notata's recipes (`grep '"status": "failed"'`) work on our folders."""
    if state is State.SUCCEEDED:
        return "complete"
    return "failed" if state.value.startswith("failed") else state.value
