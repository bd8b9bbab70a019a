"""Death detection: watch the processes attached to runs, fail a run when its last one exits.

Each pid is watched with a pidfd registered on the event loop, so an exit is seen
at once; where pidfd_open is missing the pid is polled through /proc. Pids are
compared with their process start time, so a reused pid never keeps a dead run alive.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio

from runnerd.crashfiles import native_crash
from runnerd.registry import BatchResult, FailureRecord, Registry, Store
from runnerd.states import Event, end_with_failure, failure_record
from runnerd_client.procinfo import start_time as process_start_time
from runnerd_client.protocol import FailReason

log = logging.getLogger(__name__)
POLL_INTERVAL = 0.25


def is_alive(pid: int, start_time: int | None) -> bool:
    """Whether the very process that attached (not a later one with its pid) still runs."""
    current = process_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


def exit_failure(run_dir: str | None, pids: str, note: str, at: float) -> FailureRecord:
    """The failure of a run whose processes died unreported: a native crash if crash.log
    names one (Signal:SIGSEGV with the Python stack), else ProcessExited."""
    crash = native_crash(run_dir)
    if crash is not None:
        signal, first_line, text = crash
        return failure_record(
            f"Signal:{signal}",
            f"process {pids} {first_line}",
            FailReason.CRASH,
            at,
            traceback=text,
            signal=signal,
        )
    return failure_record("ProcessExited", f"process {pids} exited {note}", FailReason.CRASH, at)


def process_exited(
    store: Store,
    run_id: str,
    pid: int,
    at: float,
    note: str,
    explanation: dict[str, Any] | None = None,
) -> None:
    """Drop a dead pid from a run; with none left, the run is failed_crash (named after the
    OOM killer when `explanation` says it struck)."""
    row = store.runs.get(run_id)
    if row is None or row.state.terminal or pid not in store.attachments.pids(run_id):
        return
    store.attachments.remove_pid(run_id, pid)
    if store.attachments.pids(run_id):
        return
    if explanation is not None:
        record = failure_record(reason=FailReason.CRASH, at=at, **explanation)
    else:
        record = exit_failure(row.run_dir, str(pid), note, at)
    end_with_failure(store, row, Event.PROCESS_EXITED, record, "watchdog")


class ProcessWatcher:
    """pid -> runs it is attached to; a pidfd (or a poll) per pid."""

    def __init__(
        self,
        registry: Registry,
        before_exit: Callable[[int], Awaitable[None]] | None = None,
        explain: Callable[[str], dict[str, Any] | None] = lambda run_id: None,
    ) -> None:
        self.registry = registry
        self.before_exit = before_exit
        self.explain = explain
        """What else is known of a run whose process exited (an OOM kill, say)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._runs: dict[int, set[str]] = defaultdict(set)
        self._starts: dict[int, int | None] = {}
        self._pidfds: dict[int, int] = {}
        self._polled: set[int] = set()

    def watch(self, run_id: str, pid: int, start_time: int | None) -> None:
        if pid in self._starts and self._starts[pid] != start_time:
            self._exited(pid)  # the pid we knew is gone and was reused
        self._runs[pid].add(run_id)
        if pid not in self._starts:
            self._starts[pid] = start_time
            self._open(pid, start_time)

    def unwatch(self, run_id: str, pid: int) -> None:
        runs = self._runs.get(pid)
        if runs is not None:
            runs.discard(run_id)
            if not runs:
                self._close(pid)

    def forget(self, run_id: str) -> None:
        for pid in [p for p, runs in self._runs.items() if run_id in runs]:
            self.unwatch(run_id, pid)

    def on_commit(self, result: BatchResult) -> None:
        effects = result.effects
        for run_id, pid, start_time in effects.attached:
            row = result.rows.get(run_id)
            if row is None or not row.state.terminal:
                self.watch(run_id, pid, start_time)
        for run_id, pid in effects.detached:
            self.unwatch(run_id, pid)
        for t in effects.transitions:
            if t.to_state.terminal:
                self.forget(t.run_id)

    def _open(self, pid: int, start_time: int | None) -> None:
        try:
            fd = os.pidfd_open(pid)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                asyncio.get_running_loop().call_soon(self._exited, pid)
            else:
                self._polled.add(pid)
            return
        if not is_alive(pid, start_time):
            os.close(fd)
            asyncio.get_running_loop().call_soon(self._exited, pid)
            return
        self._pidfds[pid] = fd
        asyncio.get_running_loop().add_reader(fd, self._exited, pid)

    def _close(self, pid: int) -> None:
        self._runs.pop(pid, None)
        self._starts.pop(pid, None)
        self._polled.discard(pid)
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _exited(self, pid: int) -> None:
        runs = self._runs.get(pid, set())
        self._close(pid)
        task = asyncio.get_running_loop().create_task(self._judge(pid, runs, time.time()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _judge(self, pid: int, runs: set[str], at: float) -> None:
        """Apply what the dead process left unsent (its spool), then judge its runs."""
        if self.before_exit is not None:
            try:
                await self.before_exit(pid)
            except Exception:
                log.exception("replaying the spool of dead pid %d failed", pid)
        for run_id in runs:
            op = partial(
                process_exited,
                run_id=run_id,
                pid=pid,
                at=at,
                note="without reporting",
                explanation=self.explain(run_id),
            )
            self.registry.submit_quietly(op, f"marking run {run_id} crashed")

    def runs(self) -> dict[str, set[int]]:
        """run_id -> the pids attached to it that are being watched."""
        by_run: dict[str, set[int]] = defaultdict(set)
        for pid, run_ids in self._runs.items():
            for run_id in run_ids:
                by_run[run_id].add(pid)
        return dict(by_run)

    async def poll(self) -> None:
        """The fallback for pids that could not get a pidfd."""
        while True:
            await anyio.sleep(POLL_INTERVAL)
            for pid in [p for p in self._polled if not is_alive(p, self._starts.get(p))]:
                self._exited(pid)

    def close(self) -> None:
        for pid in list(self._runs):
            self._close(pid)
