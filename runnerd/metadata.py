"""metadata.json in each run's folder (SPEC §7), so grep and jq work without the daemon."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from runnerd.registry import BatchResult
from runnerd_client.trust import write_atomically

log = logging.getLogger(__name__)
RETRY_FIRST, RETRY_MAX = 0.5, 10.0
GATHER = 0.05
"""Seconds a round of writes waits after the first document comes: the commits meanwhile
join it, so a run created, started and ended in quick succession is written once."""


def write_metadata(run_dir: str, doc: dict[str, Any]) -> None:
    """Replace run_dir/metadata.json atomically: a reader sees the old or the new file. The
    temporary file is made O_EXCL and O_NOFOLLOW in the folder opened once, so a symlink
    planted there is never written through; a folder anyone may write to is refused."""
    write_atomically(run_dir, "metadata.json", metadata_text(doc).encode())


def metadata_text(doc: dict[str, Any]) -> str:
    """`json.dumps(doc, indent=2)` and a newline. A document of plain values (what
    `metadata_doc` makes) is encoded by json's C encoder, each item on a line of its own,
    which is the same text in half the time (json encodes with an indent in Python)."""
    if not doc or any(isinstance(value, dict | list | tuple) for value in doc.values()):
        return json.dumps(doc, indent=2) + "\n"
    return "{\n  " + json.dumps(doc, separators=(",\n  ", ": "))[1:-1] + "\n}\n"


NICE = 10
"""How much lower than the daemon's other threads the writer's CPU priority is (Linux
sets it per thread): on a busy machine, answering clients comes before their files."""


def _yield_cpu() -> None:
    if sys.platform != "linux":  # elsewhere a thread's id may be another process's pid
        return
    with contextlib.suppress(OSError):
        here = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, here, os.getpriority(os.PRIO_PROCESS, here) + NICE)


class MetadataWriter:
    """Writes metadata files after each commit on one thread off the event loop.

    Pending documents are kept per run folder, newest wins, and a round of writes gathers
    the commits of GATHER seconds: a run's successive states collapse into one write of
    its latest state (a write costs far more than a commit's share of a batch), and the
    backlog is bounded by the number of runs, not by the number of commits. A write
    that fails (a full disk, a folder refused) is tried again, with a growing pause, until
    it lands or a newer document replaces it; it is warned about once.
    """

    def __init__(
        self, write: Callable[[str, dict[str, Any]], None] = write_metadata, gather: float = GATHER
    ) -> None:
        self._write = write
        self._gather_for = gather
        self._pending: dict[str, dict[str, Any]] = {}
        self._failed: dict[str, dict[str, Any]] = {}
        self._pause = RETRY_FIRST
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
        _yield_cpu()
        while True:
            with self._ready:
                retry_at = time.monotonic() + self._pause
                while not self._pending and not self._closing:
                    timeout = retry_at - time.monotonic() if self._failed else None
                    if timeout is not None and timeout <= 0:
                        break
                    self._ready.wait(timeout)
                self._gather()
                closing = self._closing
                docs, self._pending = {**self._failed, **self._pending}, {}
            self._write_all(docs)
            if closing:
                return

    def _gather(self) -> None:
        """Let `gather` seconds of commits join the documents pending (the lock is held)."""
        until = time.monotonic() + self._gather_for
        while self._pending and not self._closing and (left := until - time.monotonic()) > 0:
            self._ready.wait(left)

    def _write_all(self, docs: dict[str, dict[str, Any]]) -> None:
        failed = {}
        for run_dir, doc in docs.items():
            try:
                self._write(run_dir, doc)
            except OSError as exc:
                if run_dir not in self._failed:
                    log.warning(
                        "could not write metadata.json for run %s in %s: %s; will try again",
                        doc["run_id"],
                        run_dir,
                        exc,
                    )
                failed[run_dir] = doc
                continue
            if run_dir in self._failed:
                log.info("wrote metadata.json for run %s in %s after all", doc["run_id"], run_dir)
        self._failed = failed
        self._pause = min(self._pause * 2, RETRY_MAX) if failed else RETRY_FIRST

    def close(self) -> None:
        """Finish the writes already handed over (one try each for those that failed)."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()
