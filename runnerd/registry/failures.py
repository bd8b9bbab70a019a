"""Failure records (SPEC §3), the labels outside witnesses give a run's death, and the
queries that list and group failures."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from runnerd.registry.events import EventLog
from runnerd.registry.rows import FailureRecord, where
from runnerd.registry.schema import FAILURE_COLUMNS
from runnerd.times import iso
from runnerd_client.replies import FailureGroup, FailureInfo, ListedFailure

_COLUMNS = ", ".join(FAILURE_COLUMNS)
_JOINED = ", ".join(f"f.{c}" for c in FAILURE_COLUMNS)


class Failures:
    def __init__(self, conn: sqlite3.Connection, events: EventLog) -> None:
        self.conn = conn
        self.events = events

    def put(self, run_id: str, record: FailureRecord) -> None:
        r = record
        self.conn.execute(
            f"INSERT OR REPLACE INTO failures (run_id, {_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                r.failure_class,
                r.message,
                r.traceback,
                r.phase,
                r.reason,
                r.signature,
                r.category,
                r.retryable,
                r.exit_code,
                r.signal,
                r.at,
            ),
        )
        self.events.log(
            run_id,
            "failure",
            r.at,
            {
                "failure_class": r.failure_class,
                "message": r.message,
                "reason": r.reason,
                "category": r.category,
                "retryable": r.retryable,
                "signature": r.signature,
            },
        )

    def get(self, run_id: str) -> FailureRecord | None:
        """A run's failure record as stored (times as epoch seconds)."""
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM failures WHERE run_id = ?", (run_id,)
        ).fetchone()
        return FailureRecord.of(row) if row else None

    def drop(self, run_id: str) -> None:
        self.conn.execute("DELETE FROM failures WHERE run_id = ?", (run_id,))

    def put_label(self, run_id: str, category: str, note: str | None, at: float) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO run_labels (run_id, category, note, at) VALUES (?, ?, ?, ?)",
            (run_id, category, note, at),
        )

    def label(self, run_id: str) -> tuple[str, str | None] | None:
        """The label someone outside gave a run's death, if any (category, note)."""
        row = self.conn.execute(
            "SELECT category, note FROM run_labels WHERE run_id = ?", (run_id,)
        ).fetchone()
        return (row[0], row[1]) if row else None

    # --- the public failure objects ---

    def public(self, run_id: str) -> FailureInfo | None:
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM failures WHERE run_id = ?", (run_id,)
        ).fetchone()
        return failure_object(run_id, row) if row else None

    def listing(
        self,
        *,
        since: float | None = None,
        experiment: str | None = None,
        run_id: str | None = None,
        limit: int,
    ) -> list[ListedFailure]:
        """Failure records, newest first, each with its run's experiment and variation."""
        clause, args = where(
            ("f.at >= ?", since), ("r.experiment = ?", experiment), ("f.run_id = ?", run_id)
        )
        rows = self.conn.execute(
            f"SELECT f.run_id, r.experiment, r.variation, r.host, {_JOINED} FROM failures f"
            f" JOIN runs r USING (run_id) {clause} ORDER BY f.at DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [_joined_failure(r) for r in rows]

    def page(self, after: str | None, limit: int) -> list[ListedFailure]:
        """Failures in run_id order, from just after `after` (for export)."""
        rows = self.conn.execute(
            f"SELECT f.run_id, r.experiment, r.variation, r.host, {_JOINED} FROM failures f"
            " JOIN runs r USING (run_id) WHERE f.run_id > ? ORDER BY f.run_id LIMIT ?",
            (after or "", limit),
        ).fetchall()
        return [_joined_failure(r) for r in rows]

    def groups(
        self,
        key: str,
        *,
        since: float | None,
        experiment: str | None,
        limit: int,
        examples: int = 5,
    ) -> list[FailureGroup]:
        """Failures grouped by `key` (a failures column), largest group first.

        Runs are joined only to filter by experiment: a join costs a lookup per record.
        """
        join = "JOIN runs r USING (run_id)" if experiment is not None else ""
        clause, args = where(("f.at >= ?", since), ("r.experiment = ?", experiment))
        # failure_class and signature are NOT NULL: grouping by the bare column uses its index.
        expr = f"COALESCE(f.{key}, 'unknown')" if key == "category" else f"f.{key}"
        groups = self.conn.execute(
            f"SELECT {expr} AS k, COUNT(*), MIN(f.at), MAX(f.at) FROM failures f {join}"
            f" {clause} GROUP BY k ORDER BY COUNT(*) DESC, MAX(f.at) DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        by_key = self._group_samples(
            key, expr, f"FROM failures f {join}", clause, args, [g[0] for g in groups], examples
        )
        return [
            FailureGroup(
                k,
                n,
                iso(first),
                iso(last),
                [s[0] for s in by_key.get(k, [])],
                {"failure_class": by_key[k][0][1], "message": by_key[k][0][2]}
                if by_key.get(k)
                else None,
            )
            for k, n, first, last in groups
        ]

    def _group_samples(
        self,
        key: str,
        expr: str,
        source: str,
        clause: str,
        args: list[Any],
        keys: list[str],
        examples: int,
    ) -> dict[str, list[tuple[str, str, str]]]:
        """The newest `examples` (run_id, class, message) of each group.

        Signatures have an index on (signature, at): one short query per group. Other keys
        take one window over the records, rather than a scan per rare group.
        """
        if key == "signature":
            of_group = f"{clause} AND {expr} = ?" if clause else f"WHERE {expr} = ?"
            return {
                k: self.conn.execute(
                    f"SELECT f.run_id, f.failure_class, f.message {source} {of_group}"
                    " ORDER BY f.at DESC LIMIT ?",
                    (*args, k, examples),
                ).fetchall()
                for k in keys
            }
        by_key: dict[str, list[tuple[str, str, str]]] = {}
        for k, run_id, failure_class, message in self.conn.execute(
            f"SELECT k, run_id, failure_class, message FROM (SELECT {expr} AS k, f.run_id,"
            f" f.failure_class, f.message, ROW_NUMBER() OVER (PARTITION BY {expr}"
            f" ORDER BY f.at DESC) AS n {source} {clause}) WHERE n <= ?",
            (*args, examples),
        ):
            by_key.setdefault(k, []).append((run_id, failure_class, message))
        return by_key


def failure_object(run_id: str, row: Sequence[Any]) -> FailureInfo:
    """The public failure object of a failures row (columns in order)."""
    return FailureInfo(run_id=run_id, **_public(row))


def _public(row: Sequence[Any]) -> dict[str, Any]:
    values = dict(zip(FAILURE_COLUMNS, row, strict=True))
    if values["retryable"] is not None:
        values["retryable"] = bool(values["retryable"])
    values["at"] = iso(values["at"])
    return values


def _joined_failure(row: Sequence[Any]) -> ListedFailure:
    """A failure listed on its own names its run's experiment, variation and host."""
    return ListedFailure(
        run_id=row[0], **_public(row[4:]), experiment=row[1], variation=row[2], host=row[3]
    )
