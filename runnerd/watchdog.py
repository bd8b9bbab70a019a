"""Watchdog timers: missed heartbeats, lost grace and deadlines for every active run.

One heap keyed by due time serves all runs: an idle daemon sleeps until the
earliest due time. Due times derive from the persisted row (last heartbeat, time
lost, start + deadline), so a restart re-arms them exactly. A heartbeat only moves
a due time later, so it touches no timer: when an entry comes due, the check reads
the row and either acts or re-arms at the true due time.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable

import anyio

from runnerd.evidence import stopped_note
from runnerd.registry import BatchResult, FailureRecord, Registry, RunRow, RunUpdate, Store
from runnerd.states import Event, end_with_failure, failure_record, transition
from runnerd_client.protocol import FailReason, State

log = logging.getLogger(__name__)
SOURCE = "watchdog"
RECHECK_AFTER_ERROR = 60.0


def next_due(row: RunRow) -> float | None:
    """When the watchdog must next look at a run, from its persisted fields; None if never."""
    if row.state.terminal:
        return None
    dues = []
    if row.deadline and row.started_at is not None:
        dues.append(row.started_at + row.deadline)
    if row.state is State.RUNNING and row.heartbeat_timeout and row.last_heartbeat_at:
        dues.append(row.last_heartbeat_at + row.heartbeat_timeout)
    if row.state is State.LOST and row.lost_grace and row.lost_at is not None:
        dues.append(row.lost_at + row.lost_grace)
    return min(dues) if dues else None


def check_run(store: Store, run_id: str, now: float) -> float | None:
    """Apply whatever is due for a run (deadline, missed heartbeats, grace); return next due."""
    row = store.runs.get(run_id)
    if row is None or row.state.terminal:
        return None
    if row.deadline and row.started_at is not None and now >= row.started_at + row.deadline:
        record = failure_record(
            "Timeout", f"run exceeded its deadline of {row.deadline:g} s", FailReason.TIMEOUT, now
        )
        end_with_failure(store, row, Event.DEADLINE, record, SOURCE)
        return None
    if (
        row.state == State.RUNNING
        and row.last_heartbeat_at is not None
        and row.heartbeat_timeout is not None
        and now >= row.last_heartbeat_at + row.heartbeat_timeout
    ):
        stopped = stopped_note(store.attachments.pids(run_id))  # SIGSTOP, a debugger
        if stopped is not None:
            store.runs.note_stall(run_id, now, stopped)
        transition(
            store,
            row,
            Event.HEARTBEAT_MISSED,
            now,
            SOURCE,
            cause="stopped" if stopped else None,
            change=RunUpdate(lost_at=now),
        )
        row = store.runs.require(run_id)
    elif (
        row.state == State.LOST
        and row.lost_at is not None
        and row.lost_grace is not None
        and now >= row.lost_at + row.lost_grace
    ):
        end_with_failure(store, row, Event.GRACE_EXPIRED, lost_record(store, row, now), SOURCE)
        return None
    return next_due(row)


def lost_record(store: Store, row: RunRow, now: float) -> FailureRecord:
    """HeartbeatLost, or Stalled with what the daemon measured when it stalled."""
    cause = store.runs.last_cause(row.run_id)
    note = store.runs.stall_note(row.run_id) if cause in ("stalled", "stopped") else None
    if note is not None and cause == "stalled":
        return failure_record("Stalled", note["message"], FailReason.LOST, now)
    silent = f"no heartbeat for {now - (row.last_heartbeat_at or now):.0f} s"
    return failure_record(
        "HeartbeatLost", f"{silent}: {note['message']}" if note else silent, FailReason.LOST, now
    )


class Watchdog:
    """A heap of (due, run_id); the newest due per run wins, older entries are skipped."""

    def __init__(self, registry: Registry, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.clock = clock
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._changed = anyio.Event()
        self._checks: set[asyncio.Task[float | None]] = set()

    def __len__(self) -> int:
        return len(self._due)

    def arm(self, run_id: str, due: float | None) -> None:
        """Look at `run_id` at `due` (None disarms)."""
        if due is None:
            self._due.pop(run_id, None)
            return
        if self._due.get(run_id) == due:
            return
        self._due[run_id] = due
        heapq.heappush(self._heap, (due, run_id))
        if self._heap[0][1] == run_id:
            self._changed.set()

    def pop_due(self, now: float) -> list[str]:
        """Run ids whose due time has come, each once; stale heap entries are dropped."""
        ready = []
        while self._heap and self._heap[0][0] <= now:
            due, run_id = heapq.heappop(self._heap)
            if self._due.get(run_id) == due:
                del self._due[run_id]
                ready.append(run_id)
        return ready

    def next_wakeup(self) -> float | None:
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def on_commit(self, result: BatchResult) -> None:
        """Re-arm every run whose state a batch changed."""
        for run_id, row in result.rows.items():
            self.arm(run_id, next_due(row))

    async def run(self) -> None:
        """Sleep until the earliest due time, then check the runs that are due."""
        while True:
            wakeup = self.next_wakeup()
            delay = None if wakeup is None else max(0.0, wakeup - self.clock())
            self._changed = anyio.Event()
            with anyio.move_on_after(delay):
                await self._changed.wait()
            for run_id in self.pop_due(self.clock()):
                self._check(run_id)

    def _check(self, run_id: str) -> None:
        now = self.clock()
        task = asyncio.get_running_loop().create_task(
            self.registry.land(
                lambda store: check_run(store, run_id, now), f"watchdog check of {run_id}"
            )
        )
        self._checks.add(task)

        def rearm(done: asyncio.Task[float | None]) -> None:
            self._checks.discard(done)
            if done.cancelled():
                return
            if done.exception() is not None:  # not storage (`land` retries that)
                log.warning(
                    "watchdog check of %s failed: %s; again in %.0f s",
                    run_id,
                    done.exception(),
                    RECHECK_AFTER_ERROR,
                )
                self.arm(run_id, self.clock() + RECHECK_AFTER_ERROR)
            else:
                self.arm(run_id, done.result())

        task.add_done_callback(rearm)
