"""metadata.json is written once for the states a run goes through together: once per batch
(a run created, started and ended in one batch), and once for commits that come close
together; a later change is written again."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_for
from runnerd.metadata import NICE, MetadataWriter
from runnerd.registry import BatchResult, NewRun, Registry, RunUpdate, Store
from runnerd_client.protocol import State


def lifecycle(run_dir: str) -> Any:
    """create, start and succeed of one run, as one mutation."""

    def op(store: Store) -> None:
        store.runs.create(
            NewRun(
                run_id="R1",
                experiment="e",
                variation="v",
                params_json="{}",
                tags_json="{}",
                run_dir=run_dir,
                created_at=100.0,
            ),
            "test",
        )
        store.runs.set_state(
            store.runs.require("R1"),
            State.RUNNING,
            at=101.0,
            cause="start",
            source="test",
            change=RunUpdate(started_at=101.0),
        )
        store.runs.set_state(
            store.runs.require("R1"),
            State.SUCCEEDED,
            at=103.5,
            cause="succeed",
            source="test",
            change=RunUpdate(ended_at=103.5),
        )

    return op


async def test_a_run_created_started_and_ended_in_one_batch_has_one_document(
    tmp_path: Path,
) -> None:
    registry = Registry(tmp_path / "registry.sqlite3")
    await registry.open()
    committed: list[BatchResult] = []
    registry.subscribers.append(committed.append)
    task = asyncio.get_running_loop().create_task(registry.run_writer())
    try:
        await registry.submit(lifecycle(str(tmp_path / "run")))
    finally:
        registry.stop()
        await registry.drained.wait()
        await task
        await registry.close_db()
    docs = [doc for result in committed for doc in result.metadata]
    assert [
        (run_dir, doc["status"], doc["state"], doc["runtime_sec"]) for run_dir, doc in docs
    ] == [(str(tmp_path / "run"), "complete", "succeeded", 2.5)]


def result_with(run_dir: str, status: str) -> BatchResult:
    return BatchResult([], metadata=[(run_dir, {"run_id": "R1", "status": status})])


def test_commits_close_together_are_written_once_and_a_later_one_again(tmp_path: Path) -> None:
    written: list[tuple[str, str]] = []
    lock = threading.Lock()

    def write(run_dir: str, doc: dict[str, Any]) -> None:
        with lock:
            written.append((run_dir, doc["status"]))

    writer = MetadataWriter(write, gather=1.0)
    try:
        for status in ("pending", "running", "succeeded"):  # commits 20 ms apart
            writer.on_commit(result_with("/runs/R1", status))
            time.sleep(0.02)
        wait_for(lambda: written, what="the first write")
        assert written == [("/runs/R1", "succeeded")]
        writer.on_commit(result_with("/runs/R1", "failed_crash"))
        wait_for(lambda: len(written) == 2, what="the later write")
        assert written[1] == ("/runs/R1", "failed_crash")
    finally:
        writer.close()


def test_the_file_written_is_the_latest_state(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    writer = MetadataWriter()
    try:
        for status in ("pending", "running", "succeeded"):
            writer.on_commit(result_with(str(folder), status))
    finally:
        writer.close()  # finishes the writes already handed over
    assert json.loads((folder / "metadata.json").read_text())["status"] == "succeeded"
    assert [p.name for p in folder.iterdir()] == ["metadata.json"]
    assert os.stat(folder / "metadata.json").st_mode & 0o777 == 0o644


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
def test_the_writer_thread_yields_the_cpu_to_the_daemons_other_threads() -> None:
    """Its file system calls come after answering clients: it runs at a lower priority
    than the thread that made it, and that thread keeps its own."""
    nice_of: list[int] = []

    def write(run_dir: str, doc: dict[str, Any]) -> None:
        nice_of.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    writer = MetadataWriter(write, gather=0.0)
    try:
        writer.on_commit(result_with("/runs/R1", "running"))
        wait_for(lambda: nice_of, what="the write")
    finally:
        writer.close()
    assert nice_of == [min(mine + NICE, 19)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
