"""The registry on one connection, by subject; used only on that connection's thread."""

from __future__ import annotations

import sqlite3
from typing import Any

from runnerd.registry.attachments import Attachments
from runnerd.registry.effects import BatchResult, Effects
from runnerd.registry.events import EventLog
from runnerd.registry.failures import Failures
from runnerd.registry.indexing import Indexing
from runnerd.registry.runs import Runs
from runnerd.registry.sweeps import Sweeps
from runnerd.registry.upkeep import Upkeep
from runnerd.registry.views import Views


class Store:
    """Each subject of the registry has its own part; `effects` gathers what the current
    batch changed, for after its commit."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.effects = Effects()
        self.events = EventLog(conn, self.effects)
        self.runs = Runs(conn, self.effects, self.events)
        self.attachments = Attachments(conn, self.effects, self.events)
        self.failures = Failures(conn, self.events)
        self.sweeps = Sweeps(conn, self.effects)
        self.indexing = Indexing(conn)
        self.upkeep = Upkeep(conn)
        self.views = Views(conn, self.runs, self.attachments, self.failures)

    def committed(self, outcomes: list[tuple[bool, Any]]) -> BatchResult:
        """The batch just committed: its outcomes, effects, the rows of the runs it moved,
        their metadata.json documents and the sweeps it touched."""
        effects = self.effects.take()
        rows = self.runs.get_many(list(dict.fromkeys(t.run_id for t in effects.transitions)))
        # An imported run's folder, and its metadata.json, belong to the tool that made them.
        docs = [
            doc
            for row in rows.values()
            if row.tags().get("source") != "imported"
            and (doc := self.views.metadata_doc(row)) is not None
        ]
        sweeps = {*effects.sweeps, *(row.sweep_id for row in rows.values() if row.sweep_id)}
        return BatchResult(outcomes, effects, rows, docs, sweeps)
