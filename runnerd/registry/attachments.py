"""What attaches to a run: its processes, artifacts, checkpoints and resource samples."""

from __future__ import annotations

import functools
import json
import sqlite3
from typing import Any

from runnerd.registry.effects import Effects
from runnerd.registry.events import EventLog
from runnerd.times import iso
from runnerd_client.procinfo import boot_id
from runnerd_client.replies import ResumeCheckpoint

_this_boot = functools.cache(boot_id)  # one boot per daemon process


class Attachments:
    def __init__(self, conn: sqlite3.Connection, effects: Effects, events: EventLog) -> None:
        self.conn = conn
        self.effects = effects
        self.events = events

    # --- processes ---

    def add_pid(self, run_id: str, pid: int, start_time: int | None, at: float) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO run_pids (run_id, pid, start_time, at, boot_id)"
            " VALUES (?, ?, ?, ?, ?)",
            (run_id, pid, start_time, at, _this_boot()),
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

    # --- artifacts and checkpoints ---

    def put_artifact(self, run_id: str, path: str, size: int, sha256: str, at: float) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO artifacts (run_id, path, size, sha256, at)"
            " VALUES (?, ?, ?, ?, ?)",
            (run_id, path, size, sha256, at),
        )
        self.events.log(run_id, "artifact", at, {"path": path, "size": size, "sha256": sha256})

    def add_checkpoint(self, run_id: str, data_json: str, path: str | None, at: float) -> int:
        cur = self.conn.execute(
            "INSERT INTO checkpoints (run_id, data, path, at) VALUES (?, ?, ?, ?)",
            (run_id, data_json, path, at),
        )
        self.events.log(run_id, "checkpoint", at, {"data": json.loads(data_json), "path": path})
        return int(cur.lastrowid or 0)

    def resume_checkpoint(self, run_id: str) -> ResumeCheckpoint | None:
        """The newest checkpoint of a run, else of the attempt it resumed, and so on back."""
        seen: set[str] = set()
        current: str | None = run_id
        while current is not None and current not in seen:
            seen.add(current)
            row = self.conn.execute(
                "SELECT seq, data, path, at FROM checkpoints WHERE run_id = ?"
                " ORDER BY seq DESC LIMIT 1",
                (current,),
            ).fetchone()
            if row is not None:
                return ResumeCheckpoint(current, row[0], json.loads(row[1]), row[2], iso(row[3]))
            found = self.conn.execute(
                "SELECT resumed_from FROM runs WHERE run_id = ?", (current,)
            ).fetchone()
            current = found[0] if found else None
        return None

    # --- resources ---

    def put_resources(
        self, sampled: dict[str, dict[str, Any]], warnings: dict[str, dict[str, Any]], at: float
    ) -> None:
        """Record the latest sample of each run; a warning is kept and becomes an event."""
        for run_id, data in sampled.items():
            if (
                self.conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                is None
            ):
                continue
            kept = (self.resources(run_id) or {}).get("warnings", [])
            if run_id in warnings:
                warning = {**warnings[run_id], "at": iso(at)}
                kept = [*kept, warning]
                self.events.log(run_id, "memory_warning", at, warnings[run_id])
            self.conn.execute(
                "INSERT OR REPLACE INTO resources (run_id, data, at) VALUES (?, ?, ?)",
                (run_id, json.dumps({**data, "warnings": kept}), at),
            )

    def resources(self, run_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT data FROM resources WHERE run_id = ?", (run_id,)).fetchone()
        return json.loads(row[0]) if row else None
