"""`runnerctl sweep`: run a sweep's cells as launched runs, at most `jobs` at once.

Each cell is one `runnerctl exec` (process group, captured output, exit code or signal,
timeout, retries) whose run is linked to the sweep and the cell. A cell is claimed in the
daemon when its run is created (see `Cell`), so two drivers of one sweep never run a
cell twice. The daemon keeps manifest.json; the driver only ends its turn (`sweep_end`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runnerd.launch import (
    KILL_AFTER,
    Attempt,
    Launch,
    Launcher,
    Outcome,
    Retries,
    Stop,
    run_with_retries,
)
from runnerd_client.cells import substitute, variation
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key
from runnerd_client.protocol import (
    ErrorCode,
    Get,
    RunnerdError,
    SweepEnd,
    SweepGet,
    SweepPolicy,
    SweepStatus,
)
from runnerd_client.run import Cell, Client

SWEEP_ENV, CELL_ENV = "RUNNERD_SWEEP_ID", "RUNNERD_CELL"


@dataclass(frozen=True)
class Planned:
    """A cell to run now, and the attempt it follows (None: its first)."""

    index: int
    params: dict[str, Any]
    claim_after: str | None = None
    expected: dict[str, Any] | None = None  # for replicate: the cell as it ended before


@dataclass
class Result:
    """How one cell ended in this driver's turn."""

    cell: Planned
    state: str  # succeeded, failed, abandoned, or taken (claimed by another driver)
    run: dict[str, Any] | None = None
    run_id: str | None = None
    note: str = ""
    stderr_tail: bytes = b""


@dataclass
class Turn:
    """Everything one `sweep run`, `resume` or `replicate` does, and how it went."""

    sweep: dict[str, Any]
    jobs: int
    policy: str
    retries: Retries
    resume: bool = False
    results: list[Result] = field(default_factory=list)
    running: int = 0
    first_failure: Result | None = None
    interrupted: Stop | None = None


def cell_launch(sweep: dict[str, Any], cell: Planned, resume: bool) -> Launch:
    """The `exec` of one cell: the spec's command with the cell's params put in."""
    spec = sweep["spec"]
    return Launch(
        command=substitute(spec["command"], cell.params), experiment=sweep["experiment"],
        variation=variation(cell.params), params=cell.params, cwd=spec["cwd"],
        env={SWEEP_ENV: sweep["sweep_id"], CELL_ENV: str(cell.index)},
        timeout=spec.get("timeout"), memory=spec.get("memory"), resume=resume)


class Driver:
    """Runs planned cells on `jobs` threads; the main thread draws progress and takes
    signals (a thread cannot), and fail_fast stops everything from whichever cell fails."""

    def __init__(self, client: Client, turn: Turn, say: Callable[[str], None]) -> None:
        self.client, self.turn, self.say = client, turn, say
        self.launcher = Launcher()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.todo: queue.SimpleQueue[Planned] = queue.SimpleQueue()
        self.started = time.monotonic()
        self.total = 0

    def run(self, planned: list[Planned], progress: Callable[[Driver], None]) -> Turn:
        self.total = len(planned)
        for cell in planned:
            self.todo.put(cell)
        workers = [threading.Thread(target=self._work, name=f"cell-worker-{i}", daemon=True)
                   for i in range(min(self.turn.jobs, len(planned)))]
        for worker in workers:
            worker.start()
        with self.changed:
            while any(w.is_alive() for w in workers):
                progress(self)
                self.changed.wait(0.5)
        progress(self)
        return self.turn

    def stop(self, stop: Stop, grace: float | None) -> None:
        """Start no new cell and stop the running ones (from a signal or fail_fast)."""
        self.launcher.stop_all(stop, grace)

    def _work(self) -> None:
        while self.launcher.stopping is None:
            try:
                cell = self.todo.get_nowait()
            except queue.Empty:
                return
            with self.lock:
                self.turn.running += 1
            result = self._run_cell(cell)
            with self.changed:
                self.turn.running -= 1
                self.turn.results.append(result)
                self.changed.notify_all()
            self.say(line(result))
            if result.state == "failed" and self.turn.policy == SweepPolicy.FAIL_FAST:
                with self.lock:
                    self.turn.first_failure = self.turn.first_failure or result
                self.stop(Stop("FailFast", f"stopped by fail_fast: cell {cell.index} failed",
                               cause="fail_fast"), KILL_AFTER)

    def _run_cell(self, cell: Planned) -> Result:
        how = Attempt(self.launcher, echo=False,
                      cell=Cell(self.turn.sweep["sweep_id"], cell.index, cell.claim_after))
        try:
            outcome = run_with_retries(self.client, cell_launch(self.turn.sweep, cell,
                                                                self.turn.resume),
                                       self.turn.retries, how, say=lambda _: None)
        except RunnerdError as exc:
            if exc.code != ErrorCode.CONFLICT:
                raise
            return Result(cell, "taken", note=exc.message)
        return self._result(cell, outcome)

    def _result(self, cell: Planned, outcome: Outcome) -> Result:
        """How the cell ended; the daemon is asked for the record only of a failure."""
        done = outcome.run
        if outcome.succeeded:
            run = {"run_id": done.run_id, "variation": done.variation,
                   "attempt": done.attempt, "state": "succeeded", "failure": None}
            return Result(cell, "succeeded", run, done.run_id)
        fetched = fetch_run(self.client, done.run_id)
        state = "abandoned" if (fetched or {}).get("state") == "failed_abandoned" else "failed"
        return Result(cell, state, fetched, done.run_id, stderr_tail=outcome.stderr_tail)


def refresh(client: Client, results: list[Result]) -> None:
    """Fetch the runs the daemon could not show when their cells ended (it was away)."""
    for result in results:
        if result.run is None and result.run_id is not None:
            result.run = fetch_run(client, result.run_id)


def fetch_run(client: Client, run_id: str) -> dict[str, Any] | None:
    """A run as the daemon has it now (None while the daemon is away)."""
    reply = client.ask(Get(run=run_id)) or {}
    run: dict[str, Any] | None = reply.get("run") if reply.get("ok") else None
    return run


def failure_text(result: Result) -> str:
    failure = (result.run or {}).get("failure") or {}
    return f"{failure.get('failure_class', '?')}: {failure.get('message', '')}" \
        if failure else result.note


def line(result: Result) -> str:
    """One finished cell, as a plain line."""
    run_id = (result.run or {}).get("run_id", "-")
    note = "" if result.state == "succeeded" else f" ({failure_text(result)})"
    return f"cell {result.cell.index} {variation(result.cell.params)}: {result.state}" \
           f" run {run_id}{note}"


def end_turn(conn: Connection, turn: Turn) -> dict[str, Any]:
    """Tell the daemon this turn is over; its reply comes once manifest.json is written."""
    summary = conn.call(SweepGet(sweep=turn.sweep["sweep_id"]))["sweep"]["cells_summary"]
    status = SweepStatus.INTERRUPTED if turn.interrupted else \
        SweepStatus.SUCCEEDED if summary["succeeded"] == summary["total"] else \
        SweepStatus.FAILED
    return conn.call(SweepEnd(key=new_key(), sweep_id=turn.sweep["sweep_id"], status=status,
                              skip=turn.first_failure is not None))


def with_latest(cell: dict[str, Any], expected: bool = False) -> Planned:
    """Plan a known cell as the attempt after its latest one."""
    return Planned(cell["index"], cell["params"], cell["run_id"],
                   expected=cell if expected else None)


def stderr_text(result: Result) -> str:
    failure = (result.run or {}).get("failure") or {}
    return failure.get("traceback") or result.stderr_tail.decode("utf-8", "replace")


def progress_line(driver: Driver) -> str:
    turn = driver.turn
    done = sum(r.state == "succeeded" for r in turn.results)
    failed = len(turn.results) - done
    left = driver.total - len(turn.results) - turn.running
    elapsed = time.monotonic() - driver.started
    finished = len(turn.results)
    eta = elapsed / finished * (driver.total - finished) if finished else None
    return (f"{done} done, {failed} failed, {turn.running} running, {left} left,"
            f" {_clock(elapsed)} elapsed" + (f", ETA {_clock(eta)}" if eta is not None else ""))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 \
        else f"{minutes}:{secs:02d}"


