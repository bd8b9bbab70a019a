"""The event log: every committed change in order, numbered by the `seq` that `subscribe`
streams and resumes from."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Protocol

from runnerd.registry.effects import Effects
from runnerd.registry.rows import where
from runnerd.times import iso


class RunFacts(Protocol):
    """What an event tells of its run (a RunRow, or a NewRun being inserted)."""

    @property
    def experiment(self) -> str: ...
    @property
    def variation(self) -> str: ...
    @property
    def sweep_id(self) -> str | None: ...
    @property
    def tags_json(self) -> str: ...


class EventLog:
    def __init__(self, conn: sqlite3.Connection, effects: Effects) -> None:
        self.conn = conn
        self.effects = effects

    def log(
        self, run_id: str, kind: str, at: float, data: dict[str, Any], run: RunFacts | None = None
    ) -> None:
        """Append a run's event; it carries the run's experiment, variation and tags (hooks
        and consumers filter on them), looked up unless the caller has the run at hand."""
        if run is not None:
            self._append(
                run_id, run.experiment, run.sweep_id, kind, at, data, run.variation, run.tags_json
            )
            return
        found = self.conn.execute(
            "SELECT experiment, sweep_id, variation, tags FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        experiment, sweep_id, variation, tags = found or (None, None, None, None)
        self._append(run_id, experiment, sweep_id, kind, at, data, variation, tags)

    def log_sweep(
        self, sweep_id: str, experiment: str, kind: str, at: float, data: dict[str, Any]
    ) -> None:
        """A sweep's own event (its end) in the same log; it names no run (run_id '')."""
        self._append("", experiment, sweep_id, kind, at, data, None, None)

    def _append(
        self,
        run_id: str,
        experiment: str | None,
        sweep_id: str | None,
        kind: str,
        at: float,
        data: dict[str, Any],
        variation: str | None,
        tags: str | None,
    ) -> None:
        seq = self.conn.execute(  # seq is the rowid: lastrowid costs less than RETURNING
            "INSERT INTO events (run_id, experiment, sweep_id, kind, at, data)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, experiment, sweep_id, kind, at, json.dumps(data)),
        ).lastrowid
        assert seq is not None
        self.effects.events.append(
            _event(seq, run_id, experiment, sweep_id, kind, at, data, variation, tags)
        )

    def after(
        self, seq: int, run_id: str | None, experiment: str | None, sweep_id: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Logged events after `seq`, with their run's variation and tags joined in."""
        clause, args = where(
            ("e.seq > ?", seq),
            ("e.run_id = ?", run_id),
            ("e.experiment = ?", experiment),
            ("e.sweep_id = ?", sweep_id),
        )
        rows = self.conn.execute(
            "SELECT e.seq, e.run_id, e.experiment, e.sweep_id, e.kind, e.at, e.data,"
            f" r.variation, r.tags FROM events e LEFT JOIN runs r ON r.run_id = e.run_id {clause}"
            " ORDER BY e.seq LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [
            _event(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8]) for r in rows
        ]

    def last_seq(self) -> int:
        """The highest seq ever given, even if its event has since been pruned."""
        found = self.conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
        ).fetchone()
        return int(found[0]) if found else 0


def _event(
    seq: int,
    run_id: str,
    experiment: str | None,
    sweep_id: str | None,
    kind: str,
    at: float,
    data: dict[str, Any],
    variation: str | None,
    tags: str | None,
) -> dict[str, Any]:
    """An event as subscribers receive it (a sweep's own event has no run: run_id None)."""
    return {
        "event": kind,
        "seq": seq,
        "run_id": run_id or None,
        "experiment": experiment,
        "variation": variation,
        "tags": json.loads(tags) if tags and tags != "{}" else {},  # most runs have none
        "sweep_id": sweep_id,
        "at": iso(at),
        **data,
    }
