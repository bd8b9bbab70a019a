"""metadata.json in each run's folder (SPEC §7), so grep and jq work without the daemon."""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
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
    """Writes metadata files after each commit, in order, on one thread off the event loop."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runnerd-metadata")

    def on_commit(self, result: BatchResult) -> None:
        if result.metadata:
            self._pool.submit(_write_all, result.metadata)

    def close(self) -> None:
        """Finish the writes already handed over."""
        self._pool.shutdown(wait=True)
