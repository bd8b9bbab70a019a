"""Keeping the registry: idempotency keys (what makes a replayed event harmless) and
pruning old runs."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from runnerd_client.protocol import ErrorCode, RunnerdError, State
from runnerd_client.replies import fields_of

RUN_TABLES = (
    "transitions",
    "events",
    "failures",
    "artifacts",
    "checkpoints",
    "run_pids",
    "crash_files",
    "idempotency",
    "resources",
    "run_labels",
    "heartbeat_gaps",
    "runs",
)
"""Every table with a row per run (`runs` last)."""
_REPLY_JSON = json.JSONEncoder(default=fields_of)
"""Replies as the JSON kept for their keys: one encoder for every mutation (json.dumps
given `default` builds one each call)."""


class Upkeep:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def replayed(self, key: str, op: str, run_id: str, digest: str) -> dict[str, Any] | None:
        """The reply first given to `key`, if that event was applied; a key is for one event,
        so the same key with another op, run or payload (`digest`) is a conflict. Keys kept
        before schema 5 have no digest and replay as they always did."""
        row = self.conn.execute(
            "SELECT op, run_id, reply, digest FROM idempotency WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        if (row[0], row[1]) != (op, run_id):
            raise RunnerdError(
                ErrorCode.CONFLICT, f"key {key!r} was already used for {row[0]} of run {row[1]}"
            )
        if row[3] is not None and row[3] != digest:
            raise RunnerdError(
                ErrorCode.CONFLICT,
                (
                    f"key {key!r} was already used for another {op} of run {run_id}: a key names "
                    "one event, and its replay must carry the same fields; give a new event a "
                    "new key"
                ),
            )
        reply: dict[str, Any] = json.loads(row[2])
        return reply

    def remember(
        self, key: str, op: str, run_id: str, reply: dict[str, Any], at: float, digest: str
    ) -> None:
        self.conn.execute(
            "INSERT INTO idempotency (key, op, run_id, reply, at, digest)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, op, run_id, _REPLY_JSON.encode(reply), at, digest),
        )

    def prune(self, cutoff: float, states: tuple[str, ...], dry_run: bool) -> list[str]:
        """Delete terminal runs (of `states`) that ended before `cutoff`; never an active one."""
        terminal = [s.value for s in State if s.terminal and (not states or s.value in states)]
        if not terminal:
            return []
        marks = ", ".join("?" for _ in terminal)
        run_ids = [
            str(r[0])
            for r in self.conn.execute(
                f"SELECT run_id FROM runs WHERE state IN ({marks})"
                " AND COALESCE(ended_at, created_at) < ?",
                (*terminal, cutoff),
            )
        ]
        if not dry_run:
            for table in RUN_TABLES:
                self.conn.executemany(
                    f"DELETE FROM {table} WHERE run_id = ?", [(run_id,) for run_id in run_ids]
                )
        return run_ids


class BackupError(Exception):
    """A copy of the registry that failed, or failed its check; the message says which."""


def backup(source: Path, target: Path, pages: int = 4096) -> int:
    """Copy the registry at `source` to `target` with SQLite's online backup (the daemon
    keeps serving), into a hidden partial file renamed once the copy passes an integrity
    check; return how many runs it holds."""
    partial = target.with_name(f".{target.name}.partial")
    try:
        with (
            contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src,
            contextlib.closing(sqlite3.connect(partial)) as copy,
        ):
            src.backup(copy, pages=pages)
            check = copy.execute("PRAGMA integrity_check").fetchone()[0]
            runs = int(copy.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
        if check != "ok":
            raise BackupError(f"the copy failed its integrity check: {check}")
        partial.replace(target)
    except (sqlite3.Error, OSError, BackupError) as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, BackupError):
            raise
        raise BackupError(f"backup failed: {exc}") from None
    return runs
