"""The crash indexer's bookkeeping: the folders it watches and the crash files it found."""

from __future__ import annotations

import sqlite3


class Indexing:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def run_in_dir(self, folder: str) -> str | None:
        """The run whose folder is `folder`, if any."""
        row = self.conn.execute(
            "SELECT run_id FROM runs WHERE run_dir = ? LIMIT 1", (folder,)
        ).fetchone()
        return str(row[0]) if row else None

    def put_crash_file(self, run_id: str, path: str, kind: str, size: int, at: float) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO crash_files (run_id, path, kind, size, at)"
            " VALUES (?, ?, ?, ?, ?)",
            (run_id, path, kind, size, at),
        )

    def watched_dirs(self) -> list[str]:
        return [str(r[0]) for r in self.conn.execute("SELECT path FROM watched_dirs")]

    def add_watched_dir(self, path: str, at: float) -> None:
        self.conn.execute("INSERT OR IGNORE INTO watched_dirs (path, at) VALUES (?, ?)", (path, at))

    def remove_watched_dir(self, path: str) -> bool:
        cur = self.conn.execute("DELETE FROM watched_dirs WHERE path = ?", (path,))
        return cur.rowcount > 0
