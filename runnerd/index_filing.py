"""Filing what the crash indexer read under runs, on the database thread.

A foreign metadata.json becomes a run (`runnerd.foreign_runs`); a crash file is attached
to the run whose folder holds it, and gives that run's failure the traceback it lacks (a
crash.log naming a fatal signal turns ProcessExited into that signal).
"""

from __future__ import annotations

import os

from runnerd.crashfiles import crash_signal
from runnerd.foreign_runs import import_run
from runnerd.index_files import Fact, FileKind
from runnerd.registry import Store
from runnerd.states import failure_record


def owner(store: Store, path: str) -> str | None:
    """The run whose folder holds `path`: the nearest run folder above it, however deep
    (notata's `log.text("artifacts/debug/traceback", tb)` lands three folders down)."""
    folder = os.path.dirname(path)
    while True:
        run_id = store.indexing.run_in_dir(folder)
        if run_id is not None:
            return run_id
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def apply_fact(store: Store, fact: Fact, at: float) -> str:
    """File one fact; returns what happened ('imported', 'indexed', 'known', 'orphan')."""
    if fact.problem is not None:
        raise ValueError(f"{fact.path}: {fact.problem}")
    if fact.kind is FileKind.METADATA:
        return import_run(store, fact.path, fact.doc or {}, at)
    run_id = owner(store, fact.path)
    if run_id is None:
        return "orphan"
    store.indexing.put_crash_file(run_id, fact.path, fact.kind.value, fact.size, at)
    if fact.text:
        _enrich_failure(store, run_id, fact)
    return "indexed"


def _enrich_failure(store: Store, run_id: str, fact: Fact) -> None:
    """Give a failure the traceback it lacks; a crash.log turns ProcessExited into a signal."""
    failure = store.failures.get(run_id)
    if failure is None:
        return
    crash = crash_signal(fact.text or "") if fact.kind is FileKind.CRASH_LOG else None
    if crash is not None and failure.failure_class == "ProcessExited":
        signal, first_line = crash
        record = failure_record(
            f"Signal:{signal}",
            f"{failure.message}: {first_line}",
            failure.reason,
            failure.at,
            traceback=fact.text,
            signal=signal,
            exit_code=failure.exit_code,
        )
        store.failures.put(run_id, record)
    elif not failure.traceback:
        record = failure_record(
            failure.failure_class,
            failure.message,
            failure.reason,
            failure.at,
            traceback=fact.text,
            phase=failure.phase,
            exit_code=failure.exit_code,
            signal=failure.signal,
        )
        store.failures.put(run_id, record)
