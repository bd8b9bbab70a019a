"""Pure logic of the watchdog and the process checks, with an injected clock."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from runnerd.processes import is_alive, process_start_time
from runnerd.registry import Registry, RunRow
from runnerd.registry.schema import RUN_COLUMNS
from runnerd.watchdog import Watchdog, next_due


def row(state: str, **values: Any) -> RunRow:
    base = {
        "state": state,
        "deadline": None,
        "started_at": 100.0,
        "heartbeat_timeout": 60.0,
        "last_heartbeat_at": 100.0,
        "lost_grace": 600.0,
        "lost_at": None,
    }
    fields = {**base, **values}
    return RunRow.of([fields.get(name) for name in RUN_COLUMNS])


@pytest.mark.parametrize(
    ("fields", "due"),
    [
        (row("running"), 160.0),
        (row("running", last_heartbeat_at=150.0), 210.0),
        (row("running", deadline=30.0), 130.0),
        (row("lost", lost_at=170.0), 770.0),
        (row("lost", lost_at=170.0, deadline=10_000.0), 770.0),
        (row("pending", started_at=None, last_heartbeat_at=None), None),
        (row("succeeded"), None),
        (row("failed_crash"), None),
    ],
)
def test_next_due_derives_from_persisted_fields(fields: RunRow, due: float | None) -> None:
    assert next_due(fields) == due


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_heap_pops_each_due_run_once_and_skips_stale_entries(tmp_path: Any) -> None:
    clock = Clock()
    dog = Watchdog(Registry(tmp_path / "unused.db"), clock=clock)
    dog.arm("a", 1010.0)
    dog.arm("b", 1005.0)
    dog.arm("a", 1020.0)  # re-armed later: the 1010 entry is stale
    dog.arm("c", 1001.0)
    dog.arm("c", None)  # disarmed
    assert len(dog) == 2
    assert dog.next_wakeup() == 1005.0
    assert dog.pop_due(1004.0) == []
    assert dog.pop_due(1015.0) == ["b"]
    assert dog.pop_due(1030.0) == ["a"]
    assert dog.next_wakeup() is None
    assert len(dog) == 0


async def test_heap_holds_100k_runs(tmp_path: Any) -> None:
    dog = Watchdog(Registry(tmp_path / "unused.db"), clock=Clock())
    for i in range(100_000):
        dog.arm(f"run{i}", 2000.0 + i)
    assert len(dog) == 100_000
    assert dog.next_wakeup() == 2000.0
    assert dog.pop_due(2000.0 + 99) == [f"run{i}" for i in range(100)]


def test_is_alive_tells_a_reused_pid_from_the_original() -> None:
    start = process_start_time(os.getpid())
    assert start is not None
    assert is_alive(os.getpid(), start)
    assert not is_alive(os.getpid(), start + 1)


def test_a_dead_process_is_not_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start_time(proc.pid)
    proc.wait()
    assert not is_alive(proc.pid, start)
