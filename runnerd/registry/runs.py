"""Runs and their states: the runs table, the transitions that moved them, and heartbeats."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from runnerd.registry.effects import Effects, Transition
from runnerd.registry.events import EventLog, RunFacts
from runnerd.registry.rows import NO_CHANGE, NewRun, RunRow, RunUpdate
from runnerd.registry.schema import RUN_COLUMNS
from runnerd_client.protocol import ACTIVE_STATES, ErrorCode, RunnerdError, State

MAX_GAP = 10_000
"""The most skipped heartbeat seqs remembered per jump (a client never skips one: a gap is
events delivered out of order, a few at most)."""
_SELECT = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"


class Runs:
    def __init__(self, conn: sqlite3.Connection, effects: Effects, events: EventLog) -> None:
        self.conn = conn
        self.effects = effects
        self.events = events

    def get(self, run_id: str) -> RunRow | None:
        row = self.conn.execute(f"{_SELECT} WHERE run_id = ?", (run_id,)).fetchone()
        return RunRow.of(row) if row else None

    def get_many(self, run_ids: list[str]) -> dict[str, RunRow]:
        """The rows of those of `run_ids` that exist, in their order, read in one statement
        (a batch's runs are read again after it); the ids go as one JSON list, so the
        statement's text, and its cached plan, is the same for any number of them."""
        if not run_ids:  # a batch of heartbeats moved no run
            return {}
        found = {
            row[0]: RunRow.of(row)
            for row in self.conn.execute(
                f"{_SELECT} WHERE run_id IN (SELECT value FROM json_each(?))",
                (json.dumps(run_ids),),
            )
        }
        return {run_id: found[run_id] for run_id in run_ids if run_id in found}

    def require(self, run_id: str) -> RunRow:
        row = self.get(run_id)
        if row is None:
            raise RunnerdError(ErrorCode.UNKNOWN_RUN, f"no run {run_id!r}")
        return row

    def resolve(self, prefix: str) -> str:
        """The one run_id starting with `prefix` (exact match first)."""
        if not prefix:
            raise RunnerdError(ErrorCode.BAD_REQUEST, "an empty run id matches nothing")
        if self.get(prefix) is not None:
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

    def create(self, new: NewRun, source: str) -> int:
        """Insert a pending run as its experiment and variation's next attempt, and record
        its creation by `source`; return the attempt."""
        (attempt,) = self.conn.execute(
            "INSERT INTO runs (run_id, experiment, variation, attempt, state, params, tags, cwd,"
            " run_dir, host, created_at, retry_of, launch, sweep_id, cell, resumed_from,"
            " claim_token) SELECT ?, ?, ?, COALESCE(MAX(attempt), 0) + 1, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?, ?, ?, ?, ? FROM runs WHERE experiment = ? AND variation = ?"
            " RETURNING attempt",
            (
                new.run_id,
                new.experiment,
                new.variation,
                State.PENDING.value,
                new.params_json,
                new.tags_json,
                new.cwd,
                new.run_dir,
                new.host,
                new.created_at,
                new.retry_of,
                new.launch_json,
                new.sweep_id,
                new.cell,
                new.resumed_from,
                new.claim_token,
                new.experiment,
                new.variation,
            ),
        ).fetchone()
        self._record(new, new.run_id, None, State.PENDING, new.created_at, "create", source)
        return int(attempt)

    def update(self, run_id: str, change: RunUpdate) -> None:
        """Change a run's values without a transition (a heartbeat counted)."""
        self._update(run_id, change.changed())

    def _update(self, run_id: str, values: dict[str, Any]) -> None:
        sets = ", ".join(f"{col} = ?" for col in values)
        self.conn.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", (*values.values(), run_id))

    def set_state(
        self,
        row: RunRow,
        to_state: State,
        *,
        at: float,
        cause: str,
        source: str,
        change: RunUpdate = NO_CHANGE,
    ) -> None:
        """Move a run to `to_state` (with `change`), recording the transition with its cause
        and source."""
        self._update(row.run_id, {"state": to_state.value, **change.changed()})
        self._record(row, row.run_id, row.state, to_state, at, cause, source)

    def _record(
        self,
        run: RunFacts,
        run_id: str,
        from_state: State | None,
        to_state: State,
        at: float,
        cause: str,
        source: str,
    ) -> None:
        self.conn.execute(
            "INSERT INTO transitions (run_id, at, from_state, to_state, cause, source)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, at, from_state, to_state.value, cause, source),
        )
        self.effects.transitions.append(Transition(run_id, from_state, to_state, at, cause, source))
        self.events.log(
            run_id,
            "transition",
            at,
            {"from": from_state, "to": to_state.value, "cause": cause, "source": source},
            run,
        )

    def last_transition(self, run_id: str) -> tuple[str | None, str] | None:
        """(from state, source) of a run's latest transition."""
        row = self.conn.execute(
            "SELECT from_state, source FROM transitions WHERE run_id = ?"
            " ORDER BY rowid DESC LIMIT 1",
            (run_id,),
        ).fetchone()
        return (row[0], row[1]) if row else None

    def last_cause(self, run_id: str) -> str | None:
        """The cause of a run's latest transition (why it is lost: heartbeat_missed,
        stalled, stopped)."""
        row = self.conn.execute(
            "SELECT cause FROM transitions WHERE run_id = ? ORDER BY seq DESC LIMIT 1", (run_id,)
        ).fetchone()
        return str(row[0]) if row else None

    def set_stall_timeout(self, run_id: str, seconds: float) -> None:
        """The run's own stall_timeout (0: never judged stalled)."""
        self.conn.execute("UPDATE runs SET stall_timeout = ? WHERE run_id = ?", (seconds, run_id))

    def set_launch_env(self, run_id: str, env_json: str) -> None:
        """Keep the environment a launched run's command runs with (JSON text)."""
        self.conn.execute("UPDATE runs SET launch_env = ? WHERE run_id = ?", (env_json, run_id))

    def launch_env(self, run_id: str) -> dict[str, str] | None:
        """The environment a run was launched with, or None (not launched by runnerctl)."""
        row = self.conn.execute(
            "SELECT launch_env FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        return json.loads(row[0]) if row and row[0] is not None else None

    def liveness(
        self, run_ids: list[str]
    ) -> dict[str, tuple[State, str | None, str | None, float | None]]:
        """(state, cause of its latest transition, run_dir, own stall_timeout) of each run
        that exists: what the progress tracker needs of a run it starts watching."""
        found = {}
        for run_id in run_ids:
            row = self.conn.execute(
                "SELECT state, run_dir, stall_timeout FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is not None:
                found[run_id] = (State(row[0]), self.last_cause(run_id), row[1], row[2])
        return found

    def note_stall(self, run_id: str, at: float, note: dict[str, Any]) -> None:
        """What the daemon measured of a run it finds stalled or stopped (a `stalled` event,
        just before its transition to lost)."""
        self.events.log(run_id, "stalled", at, note)

    def stall_note(self, run_id: str) -> dict[str, Any] | None:
        """The latest such note of a run."""
        row = self.conn.execute(
            "SELECT data FROM events WHERE run_id = ? AND kind = 'stalled'"
            " ORDER BY seq DESC LIMIT 1",
            (run_id,),
        ).fetchone()
        return json.loads(row[0]) if row else None

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
            [(run_id, n) for n in range(max(last + 1, seq - MAX_GAP), seq)],
        )

    def fill_heartbeat_gap(self, run_id: str, seq: int) -> bool:
        """True if `seq` was skipped and has now come (once)."""
        cur = self.conn.execute(
            "DELETE FROM heartbeat_gaps WHERE run_id = ? AND seq = ?", (run_id, seq)
        )
        return cur.rowcount == 1

    def active(self) -> list[RunRow]:
        """Every run that is pending, running or lost."""
        marks = ", ".join("?" for _ in ACTIVE_STATES)
        rows = self.conn.execute(
            f"{_SELECT} WHERE state IN ({marks})", tuple(s.value for s in ACTIVE_STATES)
        ).fetchall()
        return [RunRow.of(r) for r in rows]

    def latest_attempt(self, experiment: str, variation: str) -> RunRow | None:
        row = self.conn.execute(
            "SELECT run_id FROM runs WHERE experiment = ? AND variation = ?"
            " ORDER BY attempt DESC LIMIT 1",
            (experiment, variation),
        ).fetchone()
        return self.get(row[0]) if row else None
