"""metadata.json in each run's folder (SPEC §7), so grep and jq work without the daemon."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from runnerd.registry import BatchResult

log = logging.getLogger(__name__)


def write_metadata(run_dir: str, doc: dict[str, Any]) -> None:
    """Replace run_dir/metadata.json atomically: a reader sees the old or the new file."""
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".metadata.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, folder / "metadata.json")


def _write_all(docs: list[tuple[str, dict[str, Any]]]) -> None:
    for run_dir, doc in docs:
        try:
            write_metadata(run_dir, doc)
        except OSError as exc:
            log.warning("could not write metadata.json for run %s in %s: %s",
                        doc["run_id"], run_dir, exc)


class MetadataWriter:
    """Writes metadata files after each commit on one thread off the event loop.

    Pending documents are kept per run folder, newest wins: when commits outpace the
    disk, a run's successive states collapse into one write of its latest state, and
    the backlog is bounded by the number of runs, not by the number of commits.
    """

    def __init__(self) -> None:
        self._pending: dict[str, dict[str, Any]] = {}
        self._ready = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="runnerd-metadata", daemon=True)
        self._thread.start()

    def on_commit(self, result: BatchResult) -> None:
        if result.metadata:
            with self._ready:
                self._pending.update(result.metadata)
                self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closing:
                    self._ready.wait()
                if not self._pending:
                    return
                docs, self._pending = list(self._pending.items()), {}
            _write_all(docs)

    def close(self) -> None:
        """Finish the writes already handed over."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()
