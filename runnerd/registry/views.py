"""The public run objects (SPEC §6) and metadata.json (SPEC §7), made from stored rows."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from runnerd.registry.attachments import Attachments
from runnerd.registry.failures import Failures
from runnerd.registry.rows import iso, where
from runnerd.registry.runs import Runs
from runnerd.registry.schema import RUN_COLUMNS
from runnerd_client.protocol import ACTIVE_STATES

_SELECT = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"


class Views:
    def __init__(self, conn: sqlite3.Connection, runs: Runs, attachments: Attachments,
                 failures: Failures) -> None:
        self.conn = conn
        self.runs = runs
        self.attachments = attachments
        self.failures = failures

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
        obj["pids"] = self.attachments.pids(row["run_id"])
        obj["resources"] = self.attachments.resources(row["run_id"])
        obj["failure"] = self.failures.public(row["run_id"]) \
            if row["state"].startswith("failed") else None
        return obj

    def run_details(self, run_id: str) -> dict[str, Any]:
        """A run object with its transitions, artifacts and checkpoints (for `show`)."""
        obj = self.run_object(self.runs.require(run_id))
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
        clause, args = where(("state = ?", state), ("experiment = ?", experiment),
                             ("created_at >= ?", since), ("sweep_id = ?", sweep_id))
        rows = self.conn.execute(
            f"{_SELECT} {clause} ORDER BY created_at DESC, run_id DESC LIMIT ?", (*args, limit),
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

    def interrupted_runs(self, limit: int) -> list[dict[str, Any]]:
        """Runs the reconciler found interrupted that no later attempt has taken up."""
        rows = self.conn.execute(
            f"SELECT {', '.join('r.' + c for c in RUN_COLUMNS)} FROM failures f"
            " JOIN runs r USING (run_id) WHERE f.failure_class = 'Interrupted'"
            " AND NOT EXISTS (SELECT 1 FROM runs n WHERE n.experiment = r.experiment"
            " AND n.variation = r.variation AND n.attempt > r.attempt)"
            " ORDER BY r.created_at LIMIT ?", (limit,)).fetchall()
        return [self.run_object(dict(zip(RUN_COLUMNS, r, strict=True))) for r in rows]

    def export_page(self, what: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Runs or failures in run_id order, from just after `after`."""
        if what == "failures":
            return self.failures.page(after, limit)
        rows = self.conn.execute(
            f"{_SELECT} WHERE run_id > ? ORDER BY run_id LIMIT ?", (after or "", limit),
        ).fetchall()
        return [self.run_object(dict(zip(RUN_COLUMNS, r, strict=True))) for r in rows]

    def metadata_doc(self, run_id: str) -> tuple[str, dict[str, Any]] | None:
        """(run_dir, metadata.json content) of SPEC §7, or None without a run_dir."""
        row = self.runs.get(run_id)
        if row is None or not row["run_dir"]:
            return None
        failure = self.failures.public(run_id) if row["state"].startswith("failed") else None
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


def imported(row: dict[str, Any]) -> bool:
    """Whether the crash indexer imported this run from a foreign metadata.json."""
    tags = json.loads(row["tags"] or "{}")
    return isinstance(tags, dict) and tags.get("source") == "imported"
