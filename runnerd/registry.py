"""The SQLite run registry: schema, migrations, group commit. Nothing else writes SQL.

One thread owns the writing connection. Mutations are queued and applied in batches
inside one transaction (a savepoint per operation), and every caller is answered only
once its batch is committed: with `synchronous=FULL` that means the event survives a
power cut, at the price of one fsync per batch, not per event. Reads have a connection
and a thread of their own: in WAL mode they see the last commit and wait for no writer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from runnerd.mounts import network_mount, read_mountinfo
from runnerd_client.procinfo import boot_id
from runnerd_client.protocol import ACTIVE_STATES, ErrorCode, RunnerdError, State
from runnerd_client.trust import create_file, open_folder

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        experiment TEXT NOT NULL,
        variation TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        state TEXT NOT NULL,
        params TEXT NOT NULL,
        tags TEXT NOT NULL,
        cwd TEXT,
        run_dir TEXT,
        host TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        last_heartbeat_at REAL,
        lost_at REAL,
        heartbeat_seq INTEGER NOT NULL DEFAULT 0,
        heartbeats INTEGER NOT NULL DEFAULT 0,
        heartbeat_timeout REAL,
        lost_grace REAL,
        deadline REAL,
        retry_of TEXT,
        launch TEXT,
        UNIQUE (experiment, variation, attempt)
    ) WITHOUT ROWID;
    CREATE INDEX runs_by_state ON runs (state, created_at);
    CREATE INDEX runs_by_created ON runs (created_at);
    CREATE INDEX runs_by_dir ON runs (run_dir);
    CREATE TABLE transitions (
        seq INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        at REAL NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        cause TEXT NOT NULL,
        source TEXT NOT NULL
    );
    CREATE INDEX transitions_by_run ON transitions (run_id, seq);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        experiment TEXT,
        kind TEXT NOT NULL,
        at REAL NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX events_by_run ON events (run_id, seq);
    CREATE INDEX events_by_experiment ON events (experiment, seq);
    CREATE TABLE failures (
        run_id TEXT PRIMARY KEY,
        failure_class TEXT NOT NULL,
        message TEXT NOT NULL,
        traceback TEXT,
        phase TEXT,
        reason TEXT NOT NULL,
        signature TEXT NOT NULL,
        category TEXT,
        retryable INTEGER,
        exit_code INTEGER,
        signal TEXT,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX failures_by_time ON failures (at);
    CREATE INDEX failures_by_signature ON failures (signature, at);
    CREATE TABLE artifacts (
        run_id TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (run_id, path)
    ) WITHOUT ROWID;
    CREATE TABLE checkpoints (
        seq INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        data TEXT NOT NULL,
        path TEXT,
        at REAL NOT NULL
    );
    CREATE INDEX checkpoints_by_run ON checkpoints (run_id, seq);
    CREATE TABLE run_pids (
        run_id TEXT NOT NULL,
        pid INTEGER NOT NULL,
        start_time INTEGER,
        at REAL NOT NULL,
        PRIMARY KEY (run_id, pid)
    ) WITHOUT ROWID;
    CREATE TABLE crash_files (
        run_id TEXT NOT NULL,
        path TEXT NOT NULL,
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (run_id, path)
    ) WITHOUT ROWID;
    CREATE TABLE resources (
        run_id TEXT PRIMARY KEY,
        data TEXT NOT NULL,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE watched_dirs (
        path TEXT PRIMARY KEY,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE idempotency (
        key TEXT PRIMARY KEY,
        op TEXT NOT NULL,
        run_id TEXT NOT NULL,
        reply TEXT NOT NULL,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 2: prune deletes a run's idempotency keys; without this, one full scan per run (BUG-5).
    "CREATE INDEX idempotency_by_run ON idempotency (run_id)",
    # 3: sweeps and their cells; runs linked to a cell, or to the attempt they resume.
    """
    ALTER TABLE runs ADD COLUMN sweep_id TEXT;
    ALTER TABLE runs ADD COLUMN cell INTEGER;
    ALTER TABLE runs ADD COLUMN resumed_from TEXT;
    CREATE INDEX runs_by_sweep ON runs (sweep_id, created_at) WHERE sweep_id IS NOT NULL;
    ALTER TABLE events ADD COLUMN sweep_id TEXT;
    CREATE INDEX events_by_sweep ON events (sweep_id, seq) WHERE sweep_id IS NOT NULL;
    CREATE TABLE sweeps (
        sweep_id TEXT PRIMARY KEY,
        experiment TEXT NOT NULL,
        failure_policy TEXT NOT NULL,
        spec TEXT NOT NULL,
        folder TEXT NOT NULL,
        status TEXT NOT NULL,
        driver_pid INTEGER,
        driver_start INTEGER,
        created_at REAL NOT NULL,
        ended_at REAL
    ) WITHOUT ROWID;
    CREATE TABLE sweep_cells (
        sweep_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        params TEXT NOT NULL,
        variation TEXT NOT NULL,
        latest_run_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (sweep_id, idx)
    ) WITHOUT ROWID;
    """,
    # 4: what an outside witness (Dask's scheduler) says killed a run.
    """
    CREATE TABLE run_labels (
        run_id TEXT PRIMARY KEY,
        category TEXT NOT NULL,
        note TEXT,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 5: the boot each process was attached in (another boot id at start-up means the machine
    # went down), and the digest of each keyed event (a key reused for another event conflicts).
    """
    ALTER TABLE run_pids ADD COLUMN boot_id TEXT;
    ALTER TABLE idempotency ADD COLUMN digest TEXT;
    """,
    # 6: heartbeat seqs a later seq skipped, counted if they arrive late (not replays).
    """
    CREATE TABLE heartbeat_gaps (
        run_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID;
    """,
)
MAX_GAP = 10_000
"""The most skipped heartbeat seqs remembered per jump (a client never skips one: a gap is
events delivered out of order, a few at most)."""

RUN_COLUMNS = (
    "run_id", "experiment", "variation", "attempt", "state", "params", "tags", "cwd",
    "run_dir", "host", "created_at", "started_at", "ended_at", "last_heartbeat_at", "lost_at",
    "heartbeat_seq", "heartbeats", "heartbeat_timeout", "lost_grace", "deadline", "retry_of",
    "launch", "sweep_id", "cell", "resumed_from",
)
SWEEP_COLUMNS = (
    "sweep_id", "experiment", "failure_policy", "spec", "folder", "status", "driver_pid",
    "driver_start", "created_at", "ended_at",
)
CELL_STATES = ("succeeded", "failed", "abandoned", "skipped", "running", "pending")
# A cell's state, from its latest attempt (r) and its own row (c).
CELL_STATE = (
    "CASE WHEN r.state IS NULL THEN (CASE WHEN c.skipped THEN 'skipped' ELSE 'pending' END)"
    " WHEN r.state = 'succeeded' THEN 'succeeded'"
    " WHEN r.state = 'failed_abandoned' THEN 'abandoned'"
    " WHEN r.state LIKE 'failed%' THEN 'failed' ELSE 'running' END"
)
FAILURE_COLUMNS = (
    "failure_class", "message", "traceback", "phase", "reason", "signature", "category",
    "retryable", "exit_code", "signal", "at",
)


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC, the form every public run object uses."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


@dataclass(slots=True)
class Transition:
    """A state change made inside the current batch, for after-commit work."""

    run_id: str
    from_state: State | None
    to_state: State
    at: float
    cause: str
    source: str


@dataclass
class Effects:
    """What a batch changed that the daemon must act on once it is committed."""

    transitions: list[Transition] = field(default_factory=list)
    attached: list[tuple[str, int, int | None]] = field(default_factory=list)
    detached: list[tuple[str, int]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    sweeps: list[str] = field(default_factory=list)

    def mark(self) -> tuple[int, ...]:
        return (len(self.transitions), len(self.attached), len(self.detached),
                len(self.events), len(self.sweeps))

    def rollback(self, mark: tuple[int, ...]) -> None:
        """Forget what a rolled-back operation did."""
        del self.transitions[mark[0]:]
        del self.attached[mark[1]:]
        del self.detached[mark[2]:]
        del self.events[mark[3]:]
        del self.sweeps[mark[4]:]


@dataclass
class BatchResult:
    """Each operation's outcome, plus the committed effects and the rows they touched."""

    outcomes: list[tuple[bool, Any]]
    effects: Effects = field(default_factory=Effects)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    metadata: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    sweeps: set[str] = field(default_factory=set)


class Store:
    """Synchronous access to the registry; used only on the database thread."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.effects = Effects()

    # --- runs ---

    def run_row(self, run_id: str) -> dict[str, Any] | None:
        cur = self.conn.execute(
            f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,)
        )
        row = cur.fetchone()
        return dict(zip(RUN_COLUMNS, row, strict=True)) if row else None

    def heartbeat_running(self, run_id: str, seq: int, at: float) -> bool:
        """The common heartbeat in one statement: a new seq for a running run, no transition."""
        cur = self.conn.execute(
            "UPDATE runs SET heartbeat_seq = ?, heartbeats = heartbeats + 1,"
            " last_heartbeat_at = max(coalesce(last_heartbeat_at, 0), ?)"
            " WHERE run_id = ? AND state = 'running' AND heartbeat_seq = ?",
            (seq, at, run_id, seq - 1),
        )
        return cur.rowcount == 1

    def note_heartbeat_gap(self, run_id: str, last: int, seq: int) -> None:
        """Remember the seqs between `last` and `seq` (a jump), to count them if they come."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO heartbeat_gaps (run_id, seq) VALUES (?, ?)",
            [(run_id, n) for n in range(max(last + 1, seq - MAX_GAP), seq)])

    def fill_heartbeat_gap(self, run_id: str, seq: int) -> bool:
        """True if `seq` was skipped and has now come (once)."""
        cur = self.conn.execute("DELETE FROM heartbeat_gaps WHERE run_id = ? AND seq = ?",
                                (run_id, seq))
        return cur.rowcount == 1

    def require_run(self, run_id: str) -> dict[str, Any]:
        row = self.run_row(run_id)
        if row is None:
            raise RunnerdError(ErrorCode.UNKNOWN_RUN, f"no run {run_id!r}")
        return row

    def resolve(self, prefix: str) -> str:
        """The one run_id starting with `prefix` (exact match first)."""
        if not prefix:
            raise RunnerdError(ErrorCode.BAD_REQUEST, "an empty run id matches nothing")
        if self.run_row(prefix) is not None:
            return prefix
        rows = self.conn.execute(
            "SELECT run_id FROM runs WHERE run_id >= ? AND run_id < ? LIMIT 2",
            (prefix, prefix + "\U0010ffff"),
        ).fetchall()
        if not rows:
            raise RunnerdError(ErrorCode.UNKNOWN_RUN, f"no run matches {prefix!r}")
        if len(rows) > 1:
            raise RunnerdError(ErrorCode.BAD_REQUEST, f"{prefix!r} matches more than one run")
        return str(rows[0][0])

    def next_attempt(self, experiment: str, variation: str) -> int:
        row = self.conn.execute(
            "SELECT MAX(attempt) FROM runs WHERE experiment = ? AND variation = ?",
            (experiment, variation),
        ).fetchone()
        return int(row[0] or 0) + 1

    def insert(self, table: str, values: dict[str, Any]) -> None:
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self.conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})",
                          tuple(values.values()))

    def update_run(self, run_id: str, **values: Any) -> None:
        sets = ", ".join(f"{col} = ?" for col in values)
        self.conn.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", (*values.values(), run_id))

    def set_state(self, row: dict[str, Any], to_state: State, *, at: float, cause: str,
                  source: str, **values: Any) -> None:
        """Move a run to `to_state`, recording the transition with its cause and source."""
        from_state = State(row["state"]) if row.get("state") else None
        self.update_run(row["run_id"], state=to_state.value, **values)
        self.conn.execute(
            "INSERT INTO transitions (run_id, at, from_state, to_state, cause, source)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (row["run_id"], at, from_state, to_state.value, cause, source),
        )
        self.effects.transitions.append(
            Transition(row["run_id"], from_state, to_state, at, cause, source))
        self.log_event(row["run_id"], "transition", at, {
            "from": from_state, "to": to_state.value, "cause": cause, "source": source})

    def record_creation(self, run_id: str, at: float, source: str) -> None:
        self.conn.execute(
            "INSERT INTO transitions (run_id, at, from_state, to_state, cause, source)"
            " VALUES (?, ?, NULL, ?, 'create', ?)",
            (run_id, at, State.PENDING.value, source),
        )
        self.effects.transitions.append(
            Transition(run_id, None, State.PENDING, at, "create", source))
        self.log_event(run_id, "transition", at, {
            "from": None, "to": State.PENDING.value, "cause": "create", "source": source})

    def log_event(self, run_id: str, kind: str, at: float, data: dict[str, Any]) -> None:
        """Append to the event log whose seq `subscribe` streams and resumes from; the event
        carries its run's experiment, variation and tags (hooks and consumers filter on them)."""
        run = self.conn.execute("SELECT experiment, sweep_id, variation, tags FROM runs"
                                " WHERE run_id = ?", (run_id,)).fetchone()
        experiment, sweep_id, variation, tags = run or (None, None, None, None)
        self._append_event(run_id, experiment, sweep_id, kind, at, data, variation, tags)

    def log_sweep_event(self, sweep_id: str, kind: str, at: float, data: dict[str, Any]) -> None:
        """A sweep's own event (its end) in the same log; it names no run (run_id '')."""
        experiment = self.require_sweep(sweep_id)["experiment"]
        self._append_event("", experiment, sweep_id, kind, at, data, None, None)

    def _append_event(self, run_id: str, experiment: str | None, sweep_id: str | None,
                      kind: str, at: float, data: dict[str, Any], variation: str | None,
                      tags: str | None) -> None:
        (seq,) = self.conn.execute(
            "INSERT INTO events (run_id, experiment, sweep_id, kind, at, data)"
            " VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
            (run_id, experiment, sweep_id, kind, at, json.dumps(data)),
        ).fetchone()
        self.effects.events.append(
            _event(seq, run_id, experiment, sweep_id, kind, at, data, variation, tags))

    def events_after(self, seq: int, run_id: str | None, experiment: str | None,
                     sweep_id: str | None, limit: int) -> list[dict[str, Any]]:
        """Logged events after `seq`, with their run's variation and tags joined in."""
        where, args = _where(("e.seq > ?", seq), ("e.run_id = ?", run_id),
                             ("e.experiment = ?", experiment), ("e.sweep_id = ?", sweep_id))
        rows = self.conn.execute(
            "SELECT e.seq, e.run_id, e.experiment, e.sweep_id, e.kind, e.at, e.data,"
            f" r.variation, r.tags FROM events e LEFT JOIN runs r ON r.run_id = e.run_id {where}"
            " ORDER BY e.seq LIMIT ?", (*args, limit)).fetchall()
        return [_event(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8])
                for r in rows]

    def last_event(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    # --- pids, failures, artifacts, checkpoints ---

    def add_pid(self, run_id: str, pid: int, start_time: int | None, at: float) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO run_pids (run_id, pid, start_time, at, boot_id)"
            " VALUES (?, ?, ?, ?, ?)", (run_id, pid, start_time, at, boot_id()),
        )
        self.effects.attached.append((run_id, pid, start_time))

    def remove_pid(self, run_id: str, pid: int) -> None:
        self.conn.execute("DELETE FROM run_pids WHERE run_id = ? AND pid = ?", (run_id, pid))
        self.effects.detached.append((run_id, pid))

    def pids(self, run_id: str) -> list[int]:
        return [pid for pid, _ in self.pid_records(run_id)]

    def pid_records(self, run_id: str) -> list[tuple[int, int | None]]:
        """(pid, process start time) of each process attached to a run."""
        rows = self.conn.execute(
            "SELECT pid, start_time FROM run_pids WHERE run_id = ? ORDER BY at", (run_id,)
        ).fetchall()
        return [(int(pid), start) for pid, start in rows]

    def pid_boots(self, run_id: str) -> list[tuple[int, str | None]]:
        """(pid, boot id it was attached in; None before schema 5) of a run's processes."""
        rows = self.conn.execute(
            "SELECT pid, boot_id FROM run_pids WHERE run_id = ? ORDER BY at", (run_id,)
        ).fetchall()
        return [(int(pid), boot) for pid, boot in rows]

    def active_rows(self) -> list[dict[str, Any]]:
        """Every run that is pending, running or lost."""
        marks = ", ".join("?" for _ in ACTIVE_STATES)
        rows = self.conn.execute(
            f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE state IN ({marks})",
            tuple(s.value for s in ACTIVE_STATES),
        ).fetchall()
        return [dict(zip(RUN_COLUMNS, r, strict=True)) for r in rows]

    def put_failure(self, run_id: str, record: dict[str, Any]) -> None:
        values = [record.get(col) for col in FAILURE_COLUMNS]
        self.conn.execute(
            f"INSERT OR REPLACE INTO failures (run_id, {', '.join(FAILURE_COLUMNS)})"
            f" VALUES (?, {', '.join('?' for _ in FAILURE_COLUMNS)})",
            (run_id, *values),
        )
        self.log_event(run_id, "failure", record["at"], {
            k: record.get(k) for k in ("failure_class", "message", "reason", "category",
                                       "retryable", "signature")})

    def put_label(self, run_id: str, category: str, note: str | None, at: float) -> None:
        self.conn.execute("INSERT OR REPLACE INTO run_labels (run_id, category, note, at)"
                          " VALUES (?, ?, ?, ?)", (run_id, category, note, at))

    def label(self, run_id: str) -> tuple[str, str | None] | None:
        """The label someone outside gave a run's death, if any (category, note)."""
        row = self.conn.execute("SELECT category, note FROM run_labels WHERE run_id = ?",
                                (run_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def failure_row(self, run_id: str) -> dict[str, Any] | None:
        """A run's failure record as stored (times as epoch seconds)."""
        row = self.conn.execute(
            f"SELECT {', '.join(FAILURE_COLUMNS)} FROM failures WHERE run_id = ?", (run_id,)
        ).fetchone()
        return dict(zip(FAILURE_COLUMNS, row, strict=True)) if row else None

    def drop_failure(self, run_id: str) -> None:
        self.conn.execute("DELETE FROM failures WHERE run_id = ?", (run_id,))

    def last_transition(self, run_id: str) -> tuple[str | None, str] | None:
        """(from state, source) of a run's latest transition."""
        row = self.conn.execute(
            "SELECT from_state, source FROM transitions WHERE run_id = ?"
            " ORDER BY rowid DESC LIMIT 1", (run_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def failure(self, run_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            f"SELECT {', '.join(FAILURE_COLUMNS)} FROM failures WHERE run_id = ?", (run_id,)
        ).fetchone()
        return _failure_object(run_id, row) if row else None

    def put_artifact(self, run_id: str, path: str, size: int, sha256: str, at: float) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO artifacts (run_id, path, size, sha256, at)"
            " VALUES (?, ?, ?, ?, ?)",
            (run_id, path, size, sha256, at),
        )
        self.log_event(run_id, "artifact", at, {"path": path, "size": size, "sha256": sha256})

    def add_checkpoint(self, run_id: str, data_json: str, path: str | None, at: float) -> int:
        cur = self.conn.execute(
            "INSERT INTO checkpoints (run_id, data, path, at) VALUES (?, ?, ?, ?)",
            (run_id, data_json, path, at),
        )
        self.log_event(run_id, "checkpoint", at, {"data": json.loads(data_json), "path": path})
        return int(cur.lastrowid or 0)

    # --- sweeps ---

    def insert_sweep(self, values: dict[str, Any],
                     cells: Iterable[tuple[int, str, str]]) -> None:
        """A sweep and its cells: (index, params JSON, variation) each."""
        self.insert("sweeps", values)
        self.conn.executemany(
            "INSERT INTO sweep_cells (sweep_id, idx, params, variation) VALUES (?, ?, ?, ?)",
            ((values["sweep_id"], idx, params, variation) for idx, params, variation in cells))
        self.effects.sweeps.append(values["sweep_id"])

    def sweep_row(self, sweep_id: str) -> dict[str, Any] | None:
        cur = self.conn.execute(
            f"SELECT {', '.join(SWEEP_COLUMNS)} FROM sweeps WHERE sweep_id = ?", (sweep_id,))
        row = cur.fetchone()
        return dict(zip(SWEEP_COLUMNS, row, strict=True)) if row else None

    def require_sweep(self, sweep_id: str) -> dict[str, Any]:
        row = self.sweep_row(sweep_id)
        if row is None:
            raise RunnerdError(ErrorCode.UNKNOWN_RUN, f"no sweep {sweep_id!r}")
        return row

    def resolve_sweep(self, prefix: str) -> str:
        """The one sweep_id starting with `prefix` (exact match first)."""
        if prefix and self.sweep_row(prefix) is not None:
            return prefix
        rows = self.conn.execute(
            "SELECT sweep_id FROM sweeps WHERE sweep_id >= ? AND sweep_id < ? LIMIT 2",
            (prefix, prefix + "\U0010ffff")).fetchall() if prefix else []
        if not rows:
            raise RunnerdError(ErrorCode.UNKNOWN_RUN, f"no sweep matches {prefix!r}")
        if len(rows) > 1:
            raise RunnerdError(ErrorCode.BAD_REQUEST, f"{prefix!r} matches more than one sweep")
        return str(rows[0][0])

    def update_sweep(self, sweep_id: str, **values: Any) -> None:
        sets = ", ".join(f"{col} = ?" for col in values)
        self.conn.execute(f"UPDATE sweeps SET {sets} WHERE sweep_id = ?",
                          (*values.values(), sweep_id))
        self.effects.sweeps.append(sweep_id)

    def skip_unattempted(self, sweep_id: str) -> int:
        cur = self.conn.execute(
            "UPDATE sweep_cells SET skipped = 1 WHERE sweep_id = ? AND attempts = 0",
            (sweep_id,))
        return cur.rowcount

    def cell_row(self, sweep_id: str, idx: int) -> dict[str, Any]:
        row = self.conn.execute(
            "SELECT variation, params, latest_run_id, attempts FROM sweep_cells"
            " WHERE sweep_id = ? AND idx = ?", (sweep_id, idx)).fetchone()
        if row is None:
            raise RunnerdError(ErrorCode.BAD_REQUEST, f"sweep {sweep_id} has no cell {idx}")
        return {"variation": row[0], "params": row[1], "latest_run_id": row[2],
                "attempts": row[3]}

    def claim_cell(self, sweep_id: str, idx: int, run_id: str) -> None:
        self.conn.execute(
            "UPDATE sweep_cells SET latest_run_id = ?, attempts = attempts + 1"
            " WHERE sweep_id = ? AND idx = ?", (run_id, sweep_id, idx))

    def cells(self, sweep_id: str, *, after: int = -1, limit: int = -1,
              unfinished: bool = False) -> list[dict[str, Any]]:
        """Cells in index order with their latest attempt's state and failure."""
        rows = self.conn.execute(
            f"SELECT c.idx, c.params, c.variation, c.latest_run_id, c.attempts, {CELL_STATE},"
            f" r.host, {', '.join(f'f.{c}' for c in FAILURE_COLUMNS)}"
            " FROM sweep_cells c LEFT JOIN runs r ON r.run_id = c.latest_run_id"
            " LEFT JOIN failures f ON f.run_id = c.latest_run_id"
            " WHERE c.sweep_id = ? AND c.idx > ?"
            + (" AND r.state IS NOT 'succeeded'" if unfinished else "")
            + " ORDER BY c.idx LIMIT ?", (sweep_id, after, limit)).fetchall()
        return [{"index": r[0], "params": json.loads(r[1]), "variation": r[2], "run_id": r[3],
                 "attempts": r[4], "state": r[5], "host": r[6],
                 "failure": _failure_object(r[3], r[7:]) if r[7] is not None else None}
                for r in rows]

    def live_cells(self, sweep_id: str) -> int:
        """Cells whose latest attempt is pending or running (a lost one may never return)."""
        return int(self.conn.execute(
            "SELECT COUNT(*) FROM sweep_cells c JOIN runs r ON r.run_id = c.latest_run_id"
            " WHERE c.sweep_id = ? AND r.state IN ('pending', 'running')",
            (sweep_id,)).fetchone()[0])

    def cells_summary(self, sweep_id: str) -> dict[str, int]:
        summary = dict.fromkeys(CELL_STATES, 0)
        for state, n in self.conn.execute(
                f"SELECT {CELL_STATE} AS s, COUNT(*) FROM sweep_cells c LEFT JOIN runs r"
                " ON r.run_id = c.latest_run_id WHERE c.sweep_id = ? GROUP BY s", (sweep_id,)):
            summary[state] = n
        return {"total": sum(summary.values()), **summary}

    def sweep_rows(self, limit: int) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            f"SELECT {', '.join(SWEEP_COLUMNS)} FROM sweeps ORDER BY created_at DESC LIMIT ?",
            (limit,)).fetchall()
        return [dict(zip(SWEEP_COLUMNS, r, strict=True)) for r in rows]

    # --- resuming ---

    def latest_attempt(self, experiment: str, variation: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT run_id FROM runs WHERE experiment = ? AND variation = ?"
            " ORDER BY attempt DESC LIMIT 1", (experiment, variation)).fetchone()
        return self.run_row(row[0]) if row else None

    def resume_checkpoint(self, run_id: str) -> dict[str, Any] | None:
        """The newest checkpoint of a run, else of the attempt it resumed, and so on back."""
        seen: set[str] = set()
        current: str | None = run_id
        while current is not None and current not in seen:
            seen.add(current)
            row = self.conn.execute(
                "SELECT seq, data, path, at FROM checkpoints WHERE run_id = ?"
                " ORDER BY seq DESC LIMIT 1", (current,)).fetchone()
            if row is not None:
                return {"run_id": current, "seq": row[0], "data": json.loads(row[1]),
                        "path": row[2], "at": iso(row[3])}
            found = self.conn.execute("SELECT resumed_from FROM runs WHERE run_id = ?",
                                      (current,)).fetchone()
            current = found[0] if found else None
        return None

    def interrupted_runs(self, limit: int) -> list[dict[str, Any]]:
        """Runs the reconciler found interrupted that no later attempt has taken up."""
        rows = self.conn.execute(
            f"SELECT {', '.join('r.' + c for c in RUN_COLUMNS)} FROM failures f"
            " JOIN runs r USING (run_id) WHERE f.failure_class = 'Interrupted'"
            " AND NOT EXISTS (SELECT 1 FROM runs n WHERE n.experiment = r.experiment"
            " AND n.variation = r.variation AND n.attempt > r.attempt)"
            " ORDER BY r.created_at LIMIT ?", (limit,)).fetchall()
        return [self.run_object(dict(zip(RUN_COLUMNS, r, strict=True))) for r in rows]

    # --- the crash indexer ---

    def run_in_dir(self, folder: str) -> str | None:
        row = self.conn.execute("SELECT run_id FROM runs WHERE run_dir = ? LIMIT 1",
                                (folder,)).fetchone()
        return str(row[0]) if row else None

    def put_crash_file(self, run_id: str, path: str, kind: str, size: int, at: float) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO crash_files (run_id, path, kind, size, at)"
            " VALUES (?, ?, ?, ?, ?)", (run_id, path, kind, size, at))

    def watched_dirs(self) -> list[str]:
        return [str(r[0]) for r in self.conn.execute("SELECT path FROM watched_dirs")]

    def add_watched_dir(self, path: str, at: float) -> None:
        self.conn.execute("INSERT OR IGNORE INTO watched_dirs (path, at) VALUES (?, ?)",
                          (path, at))

    def remove_watched_dir(self, path: str) -> bool:
        cur = self.conn.execute("DELETE FROM watched_dirs WHERE path = ?", (path,))
        return cur.rowcount > 0

    # --- resources ---

    def put_resources(self, sampled: dict[str, dict[str, Any]],
                      warnings: dict[str, dict[str, Any]], at: float) -> None:
        """Record the latest sample of each run; a warning is kept and becomes an event."""
        for run_id, data in sampled.items():
            if self.run_row(run_id) is None:
                continue
            kept = (self.resources(run_id) or {}).get("warnings", [])
            if run_id in warnings:
                warning = {**warnings[run_id], "at": iso(at)}
                kept = [*kept, warning]
                self.log_event(run_id, "memory_warning", at, warnings[run_id])
            self.conn.execute(
                "INSERT OR REPLACE INTO resources (run_id, data, at) VALUES (?, ?, ?)",
                (run_id, json.dumps({**data, "warnings": kept}), at))

    def resources(self, run_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT data FROM resources WHERE run_id = ?",
                                (run_id,)).fetchone()
        return json.loads(row[0]) if row else None

    # --- maintenance ---

    def prune(self, cutoff: float, states: tuple[str, ...], dry_run: bool) -> list[str]:
        """Delete terminal runs (of `states`) that ended before `cutoff`; never an active one."""
        terminal = [s.value for s in State if s.terminal and (not states or s.value in states)]
        if not terminal:
            return []
        marks = ", ".join("?" for _ in terminal)
        run_ids = [str(r[0]) for r in self.conn.execute(
            f"SELECT run_id FROM runs WHERE state IN ({marks})"
            " AND COALESCE(ended_at, created_at) < ?", (*terminal, cutoff))]
        if not dry_run:
            for table in ("transitions", "events", "failures", "artifacts", "checkpoints",
                          "run_pids", "crash_files", "idempotency", "resources", "run_labels",
                          "heartbeat_gaps", "runs"):
                self.conn.executemany(f"DELETE FROM {table} WHERE run_id = ?",
                                      [(run_id,) for run_id in run_ids])
        return run_ids

    # --- idempotency ---

    def replayed(self, key: str, op: str, run_id: str, digest: str) -> dict[str, Any] | None:
        """The reply first given to `key`, if that event was applied; a key is for one event,
        so the same key with another op, run or payload (`digest`) is a conflict. Keys kept
        before schema 5 have no digest and replay as they always did."""
        row = self.conn.execute(
            "SELECT op, run_id, reply, digest FROM idempotency WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if (row[0], row[1]) != (op, run_id):
            raise RunnerdError(ErrorCode.CONFLICT,
                               f"key {key!r} was already used for {row[0]} of run {row[1]}")
        if row[3] is not None and row[3] != digest:
            raise RunnerdError(ErrorCode.CONFLICT, (
                f"key {key!r} was already used for another {op} of run {run_id}: a key names "
                "one event, and its replay must carry the same fields; give a new event a "
                "new key"))
        reply: dict[str, Any] = json.loads(row[2])
        return reply

    def remember(self, key: str, op: str, run_id: str, reply: dict[str, Any], at: float,
                 digest: str) -> None:
        self.conn.execute(
            "INSERT INTO idempotency (key, op, run_id, reply, at, digest)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, op, run_id, json.dumps(reply), at, digest),
        )

    # --- public views ---

    def run_object(self, row: dict[str, Any]) -> dict[str, Any]:
        """The public run object of SPEC §6, built from a runs row."""
        obj: dict[str, Any] = {
            key: row[key]
            for key in ("run_id", "experiment", "variation", "attempt", "state", "cwd",
                        "run_dir", "host", "heartbeats", "heartbeat_timeout", "lost_grace",
                        "deadline", "retry_of", "resumed_from", "sweep_id", "cell")
        }
        obj["params"] = json.loads(row["params"])
        obj["launch"] = json.loads(row["launch"]) if row["launch"] else None
        obj["tags"] = json.loads(row["tags"])
        for key in ("created_at", "started_at", "ended_at", "last_heartbeat_at"):
            obj[key] = iso(row[key])
        obj["pids"] = self.pids(row["run_id"])
        obj["resources"] = self.resources(row["run_id"])
        obj["failure"] = self.failure(row["run_id"]) if row["state"].startswith("failed") else None
        return obj

    def run_details(self, run_id: str) -> dict[str, Any]:
        """A run object with its transitions, artifacts and checkpoints (for `show`)."""
        obj = self.run_object(self.require_run(run_id))
        obj["transitions"] = [
            {"seq": r[0], "at": iso(r[1]), "from": r[2], "to": r[3], "cause": r[4],
             "source": r[5]}
            for r in self.conn.execute(
                "SELECT seq, at, from_state, to_state, cause, source FROM transitions"
                " WHERE run_id = ? ORDER BY seq", (run_id,))
        ]
        obj["artifacts"] = [
            {"path": r[0], "size": r[1], "sha256": r[2], "registered_at": iso(r[3])}
            for r in self.conn.execute(
                "SELECT path, size, sha256, at FROM artifacts WHERE run_id = ? ORDER BY at",
                (run_id,))
        ]
        obj["crash_files"] = [
            {"path": r[0], "kind": r[1], "size": r[2], "at": iso(r[3])}
            for r in self.conn.execute(
                "SELECT path, kind, size, at FROM crash_files WHERE run_id = ? ORDER BY path",
                (run_id,))
        ]
        obj["checkpoints"] = [
            {"seq": r[0], "data": json.loads(r[1]), "path": r[2], "at": iso(r[3])}
            for r in self.conn.execute(
                "SELECT seq, data, path, at FROM checkpoints WHERE run_id = ? ORDER BY seq",
                (run_id,))
        ]
        return obj

    def list_runs(self, *, state: str | None, experiment: str | None, since: float | None,
                  limit: int, sweep_id: str | None = None) -> list[dict[str, Any]]:
        where, args = _where(("state = ?", state), ("experiment = ?", experiment),
                             ("created_at >= ?", since), ("sweep_id = ?", sweep_id))
        rows = self.conn.execute(
            f"SELECT {', '.join(RUN_COLUMNS)} FROM runs {where}"
            " ORDER BY created_at DESC, run_id DESC LIMIT ?", (*args, limit),
        ).fetchall()
        return [self.run_object(dict(zip(RUN_COLUMNS, r, strict=True))) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, COUNT(*) FROM runs GROUP BY state").fetchall()
        return {str(state): int(n) for state, n in rows}

    def active_runs(self, limit: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for state in ACTIVE_STATES:
            out += self.list_runs(state=state.value, experiment=None, since=None, limit=limit)
        out.sort(key=lambda r: r["created_at"], reverse=True)
        return out[:limit]

    def failures(self, *, since: float | None = None, experiment: str | None = None,
                 run_id: str | None = None, limit: int) -> list[dict[str, Any]]:
        """Failure records, newest first, each with its run's experiment and variation."""
        where, args = _where(("f.at >= ?", since), ("r.experiment = ?", experiment),
                             ("f.run_id = ?", run_id))
        cols = ", ".join(f"f.{c}" for c in FAILURE_COLUMNS)
        rows = self.conn.execute(
            f"SELECT f.run_id, r.experiment, r.variation, r.host, {cols} FROM failures f"
            f" JOIN runs r USING (run_id) {where} ORDER BY f.at DESC LIMIT ?", (*args, limit),
        ).fetchall()
        return [_joined_failure(r) for r in rows]

    def failure_groups(self, key: str, *, since: float | None, experiment: str | None,
                       limit: int, examples: int = 5) -> list[dict[str, Any]]:
        """Failures grouped by `key` (a failures column), largest group first.

        Runs are joined only to filter by experiment: a join costs a lookup per record.
        """
        join = "JOIN runs r USING (run_id)" if experiment is not None else ""
        where, args = _where(("f.at >= ?", since), ("r.experiment = ?", experiment))
        # failure_class and signature are NOT NULL: grouping by the bare column uses its index.
        expr = f"COALESCE(f.{key}, 'unknown')" if key == "category" else f"f.{key}"
        groups = self.conn.execute(
            f"SELECT {expr} AS k, COUNT(*), MIN(f.at), MAX(f.at) FROM failures f {join} {where}"
            " GROUP BY k ORDER BY COUNT(*) DESC, MAX(f.at) DESC LIMIT ?", (*args, limit),
        ).fetchall()
        by_key = self._group_samples(key, expr, f"FROM failures f {join}", where, args,
                                     [g[0] for g in groups], examples)
        return [{"key": k, "count": n, "first_seen": iso(first), "last_seen": iso(last),
                 "run_ids": [s[0] for s in by_key.get(k, [])],
                 "example": {"failure_class": by_key[k][0][1], "message": by_key[k][0][2]}
                 if by_key.get(k) else None}
                for k, n, first, last in groups]

    def _group_samples(self, key: str, expr: str, source: str, where: str, args: list[Any],
                       keys: list[str], examples: int) -> dict[str, list[tuple[str, str, str]]]:
        """The newest `examples` (run_id, class, message) of each group.

        Signatures have an index on (signature, at): one short query per group. Other keys
        take one window over the records, rather than a scan per rare group.
        """
        if key == "signature":
            of_group = f"{where} AND {expr} = ?" if where else f"WHERE {expr} = ?"
            return {k: self.conn.execute(
                f"SELECT f.run_id, f.failure_class, f.message {source} {of_group}"
                " ORDER BY f.at DESC LIMIT ?", (*args, k, examples)).fetchall() for k in keys}
        by_key: dict[str, list[tuple[str, str, str]]] = {}
        for k, run_id, failure_class, message in self.conn.execute(
                f"SELECT k, run_id, failure_class, message FROM (SELECT {expr} AS k, f.run_id,"
                f" f.failure_class, f.message, ROW_NUMBER() OVER (PARTITION BY {expr}"
                f" ORDER BY f.at DESC) AS n {source} {where}) WHERE n <= ?", (*args, examples)):
            by_key.setdefault(k, []).append((run_id, failure_class, message))
        return by_key

    def export_page(self, what: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Runs or failures in run_id order, from just after `after`."""
        if what == "failures":
            cols = ", ".join(f"f.{c}" for c in FAILURE_COLUMNS)
            rows = self.conn.execute(
                f"SELECT f.run_id, r.experiment, r.variation, r.host, {cols} FROM failures f"
                " JOIN runs r USING (run_id) WHERE f.run_id > ? ORDER BY f.run_id LIMIT ?",
                (after or "", limit),
            ).fetchall()
            return [_joined_failure(r) for r in rows]
        rows = self.conn.execute(
            f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE run_id > ? ORDER BY run_id LIMIT ?",
            (after or "", limit),
        ).fetchall()
        return [self.run_object(dict(zip(RUN_COLUMNS, r, strict=True))) for r in rows]

    def metadata_doc(self, run_id: str) -> tuple[str, dict[str, Any]] | None:
        """(run_dir, metadata.json content) of SPEC §7, or None without a run_dir."""
        row = self.run_row(run_id)
        if row is None or not row["run_dir"]:
            return None
        failure = self.failure(run_id) if row["state"].startswith("failed") else None
        start, end = row["started_at"], row["ended_at"]
        return row["run_dir"], {
            "run_id": run_id,
            "experiment": row["experiment"],
            "variation": row["variation"],
            "attempt": row["attempt"],
            "status": row["state"],
            "start_time": iso(start),
            "end_time": iso(end),
            "runtime_sec": round(end - start, 3) if start is not None and end is not None
            else None,
            "failure_reason": failure["reason"] if failure else None,
            "failure_class": failure["failure_class"] if failure else None,
        }


def _event(seq: int, run_id: str, experiment: str | None, sweep_id: str | None, kind: str,
           at: float, data: dict[str, Any], variation: str | None,
           tags: str | None) -> dict[str, Any]:
    """An event as subscribers receive it (a sweep's own event has no run: run_id None)."""
    return {"event": kind, "seq": seq, "run_id": run_id or None, "experiment": experiment,
            "variation": variation, "tags": json.loads(tags) if tags else {},
            "sweep_id": sweep_id, "at": iso(at), **data}


def _where(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause of the conditions whose value is given, and their arguments."""
    used = [(clause, value) for clause, value in conditions if value is not None]
    where = f"WHERE {' AND '.join(clause for clause, _ in used)}" if used else ""
    return where, [value for _, value in used]


def _imported(row: dict[str, Any]) -> bool:
    """Whether the crash indexer imported this run from a foreign metadata.json."""
    tags = json.loads(row["tags"] or "{}")
    return isinstance(tags, dict) and tags.get("source") == "imported"


def _failure_object(run_id: str, row: Iterable[Any]) -> dict[str, Any]:
    record = dict(zip(FAILURE_COLUMNS, row, strict=True))
    record["at"] = iso(record["at"])
    if record["retryable"] is not None:
        record["retryable"] = bool(record["retryable"])
    return {"run_id": run_id, **record}


def _joined_failure(row: Sequence[Any]) -> dict[str, Any]:
    """A failure listed on its own names its run's experiment, variation and host."""
    return {**_failure_object(row[0], row[4:]), "experiment": row[1], "variation": row[2],
            "host": row[3]}


Op = Callable[[Store], Any]
# SQLite's primary result codes of a storage fault that may pass: a write that met one is
# worth trying again (a full disk is freed, a lock released, a flaky disk comes back).
TRANSIENT = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED,
                       sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL})
DAMAGED = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
RETRY_FIRST, RETRY_MAX = 0.1, 5.0


def _code(exc: sqlite3.Error) -> int:
    """SQLite's primary result code of an error (-1 when it has none)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else -1


class DamagedRegistry(sqlite3.DatabaseError):
    """`PRAGMA quick_check` found the registry damaged; the message is what it found."""


class StorageError(RunnerdError):
    """A write the registry's storage refused for now (full, locked, I/O): tried again, it
    may land. Answered to a client as `unavailable`, which its spool retries."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


def _write_error(exc: sqlite3.Error) -> RunnerdError:
    message = f"registry write failed: {exc}"
    return StorageError(message) if _code(exc) in TRANSIENT else \
        RunnerdError(ErrorCode.UNAVAILABLE, message)


class _Worker:
    """One SQLite connection and the one thread that uses it; each call is one hop."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._turn = asyncio.Lock()
        self.conn: sqlite3.Connection | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the thread. Calls wait their turn here, not in the thread's queue, so
        one cancelled before its turn (its client gone) never runs."""
        async with self._turn:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def close(self) -> None:
        if self.conn is not None:
            await self.call(self.conn.close)
            self.conn = None
        self._pool.shutdown(wait=False)


class Registry:
    """The async face of the registry: group-committed mutations on one connection, reads on
    another (so a write waiting for a lock another process holds delays no read)."""

    def __init__(self, path: Path, *, synchronous: str = "FULL", max_batch: int = 512,
                 busy_timeout_ms: int = 5000,
                 mountinfo: Callable[[], str] = read_mountinfo) -> None:
        self.path = path
        self.mountinfo = mountinfo
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.busy_timeout_ms = busy_timeout_ms
        self._writer: _Worker | None = None
        self._reader: _Worker | None = None
        self._store: Store | None = None
        self._read_store: Store | None = None
        self._queue: list[tuple[Op, asyncio.Future[Any]]] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._landing: set[asyncio.Task[Any]] = set()
        self.drained = asyncio.Event()
        self.subscribers: list[Callable[[BatchResult], None]] = []

    async def open(self) -> None:
        """Open (creating if needed, 0600) the database, check it and run pending migrations;
        a registry that is locked, damaged or emptied is refused, saying what to do."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._refuse_network_filesystem()
        created = self._create_or_check_file()
        writer, reader = _Worker("runnerd-db-write"), _Worker("runnerd-db-read")
        try:
            writer.conn = await writer.call(self._connect)
            await writer.call(self._init_sync, writer.conn, created)
            reader.conn = await reader.call(self._connect)
            await reader.call(reader.conn.execute, "PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            await reader.close()
            await writer.close()
            raise RunnerdError(ErrorCode.UNAVAILABLE, self._refusal(exc)) from exc
        self._writer, self._reader = writer, reader
        self._store, self._read_store = Store(writer.conn), Store(reader.conn)

    def _create_or_check_file(self) -> bool:
        """Create the registry file 0600 (SQLite gives its -wal and -shm the same mode);
        whether it is new. An existing empty file is refused: SQLite would start a new
        registry over what was lost."""
        try:
            with open_folder(self.path.parent) as folder:
                os.close(create_file(folder, self.path.name, mode=0o600))
            return True
        except FileExistsError:
            pass
        if self.path.stat().st_size == 0:
            raise RunnerdError(ErrorCode.UNAVAILABLE, (
                f"the registry {self.path} exists but is empty (0 bytes): a failed copy or a "
                "full disk may have emptied it, and runnerd will not start a new registry "
                "over it. Put back a copy made with `runnerctl backup` if you have one; to "
                f"start afresh, remove it (rm {self.path}) and start runnerd again"))
        return False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        return conn

    def _refusal(self, exc: sqlite3.Error) -> str:
        """Why the registry cannot be used, and what to do about it."""
        code, path = _code(exc), self.path
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return (f"the registry {path} is locked by another process (waited "
                    f"{self.busy_timeout_ms / 1000:g} s): another runnerd, or a tool such as "
                    "sqlite3 or a backup, holds a write transaction on it. Find it with "
                    f"`fuser -v {path}` (or `lsof {path}`), let it finish or stop it, then "
                    "start runnerd again")
        if code in DAMAGED or isinstance(exc, DamagedRegistry):
            return (f"the registry {path} is damaged ({exc}); runnerd will not write to it. "
                    f"Keep it aside (mv {path} {path}.damaged, with its -wal file if any), "
                    "then put back a copy made with `runnerctl backup`, or rebuild what "
                    f"can be read: sqlite3 {path}.damaged .recover | sqlite3 {path} ; "
                    "then start runnerd again")
        return f"cannot open registry {path}: {exc}"

    def _refuse_network_filesystem(self) -> None:
        """WAL's shared-memory index is not coherent across machines: refuse before it is made."""
        found = network_mount(self.path.parent, self.mountinfo())
        if found is not None:
            point, fstype = found
            raise RunnerdError(ErrorCode.UNAVAILABLE, (
                f"refusing the registry {self.path}: it is on {fstype} (mounted at {point}), a "
                "network filesystem, and SQLite's WAL needs shared memory on a local "
                "filesystem. Use a node-local path such as $TMPDIR or /var/tmp, e.g. "
                "RUNNERD_DB=/var/tmp/$USER/runnerd/registry.sqlite3 (or runnerd --db)"))

    def _init_sync(self, conn: sqlite3.Connection, created: bool) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.DatabaseError(f"could not switch to WAL mode (got {mode})")
        # Take the write lock once: a registry another process holds is refused now, by name,
        # rather than at the first write.
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        if not created:
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise DamagedRegistry("; ".join(problems))
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this runnerd knows ({len(MIGRATIONS)})"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.executescript(
                f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")
            log.info("registry migrated to schema version %d", number)

    def submit(self, op: Op) -> asyncio.Future[Any]:
        """Queue a mutation; the future resolves once its batch is durable."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_exception(RunnerdError(ErrorCode.UNAVAILABLE, "daemon is shutting down"))
            return future
        self._queue.append((op, future))
        self._wakeup.set()
        return future

    async def land(self, op: Callable[[Store], T], what: str) -> T:
        """Apply a change the daemon made itself (a death judged, a deadline passed): no
        client will retry it, so a storage failure is retried here, with backoff, until it
        lands; only a daemon that stops gives up (its restart judges again from the record)."""
        delay, failures = RETRY_FIRST, 0
        while True:
            try:
                result: T = await self.submit(op)
            except StorageError as exc:
                if self._closing:
                    raise
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "%s failed: %s; retrying in %.1f s until it lands", what, exc.message,
                        delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if failures:
                log.info("%s landed after %d failed attempts", what, failures)
            return result

    def submit_quietly(self, op: Op, what: str) -> None:
        """`land` a change nobody waits for; a failure other than storage is logged."""

        async def landed() -> None:
            try:
                await self.land(op, what)
            except Exception as exc:
                log.warning("%s failed: %s", what, exc)

        task = asyncio.get_running_loop().create_task(landed())
        self._landing.add(task)
        task.add_done_callback(self._landing.discard)

    async def read(self, op: Callable[[Store], T]) -> T:
        """Run a read-only function on the reading connection's thread."""
        reader, store = self._require_open(self._reader, self._read_store)
        try:
            result: T = await reader.call(op, store)
        except sqlite3.Error as exc:
            raise RunnerdError(ErrorCode.UNAVAILABLE, f"registry read failed: {exc}") from exc
        return result

    async def run_writer(self) -> None:
        """Apply queued mutations in batches until `stop` is called and the queue is empty."""
        writer, store = self._require_open(self._writer, self._store)
        while True:
            if not self._queue:
                if self._closing:
                    self.drained.set()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                result = await writer.call(self._apply, store, [op for op, _ in batch])
            except Exception as exc:
                log.exception("registry writer failed")
                error = RunnerdError(ErrorCode.UNAVAILABLE, f"registry write failed: {exc}")
                result = BatchResult([(False, error)] * len(batch))
            for (_, future), (ok, value) in zip(batch, result.outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            for subscriber in self.subscribers:
                subscriber(result)

    def _apply(self, store: Store, ops: list[Op]) -> BatchResult:
        """Run a batch in one transaction; one savepoint per op isolates its failure."""
        conn = store.conn
        store.effects = Effects()
        outcomes: list[tuple[bool, Any]] = []
        try:
            if conn.in_transaction:  # left open by a rollback that failed last time
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                outcomes.append(self._apply_one(store, op))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as again:
                    log.error("rollback failed (tried again before the next batch): %s", again)
            log.error("batch of %d mutations not committed: %s", len(ops), exc)
            return BatchResult([(False, _write_error(exc))] * len(ops))
        effects = store.effects
        changed = dict.fromkeys(t.run_id for t in effects.transitions)
        rows = {run_id: row for run_id in changed if (row := store.run_row(run_id)) is not None}
        # An imported run's folder, and its metadata.json, belong to the tool that made them.
        docs = [doc for run_id, row in rows.items() if not _imported(row)
                and (doc := store.metadata_doc(run_id)) is not None]
        sweeps = {*effects.sweeps, *(row["sweep_id"] for row in rows.values() if row["sweep_id"])}
        return BatchResult(outcomes, effects, rows, docs, sweeps)

    @staticmethod
    def _apply_one(store: Store, op: Op) -> tuple[bool, Any]:
        conn = store.conn
        mark = store.effects.mark()
        conn.execute("SAVEPOINT op")
        try:
            value = op(store)
        except sqlite3.OperationalError:
            raise  # the database itself failed (full, locked): the whole batch is off
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            store.effects.rollback(mark)
            if isinstance(exc, RunnerdError):
                return False, exc
            log.exception("mutation failed")
            return False, RunnerdError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        conn.execute("RELEASE op")
        return True, value

    def stop(self) -> None:
        """Take no new mutations; the writer applies those queued, then sets `drained`."""
        self._closing = True
        self._wakeup.set()

    async def close_db(self) -> None:
        """Close the reading connection, then the writing one (the last to close folds the
        WAL into the database and removes it)."""
        for worker in (self._reader, self._writer):
            if worker is not None:
                await worker.close()
        self._reader = self._writer = None

    @staticmethod
    def _require_open(worker: _Worker | None, store: Store | None) -> tuple[_Worker, Store]:
        if worker is None or store is None:
            raise RunnerdError(ErrorCode.UNAVAILABLE, "registry is not open")
        return worker, store
