"""`runnerctl sweep`: a sweep's cells as launched runs, through the client's sweep engine.

Each attempt is one `runnerctl exec` (process group, captured output, exit code or signal,
timeout) whose run claims its cell in the daemon (see `Cell`), so two drivers of one sweep
never run a cell twice. What runs when, the retries and fail_fast are the engine's
(`runnerd_client.sweep_engine`), the same as for `rd.sweep` and Dask: here the main thread
runs the engine and takes the signals, and `jobs` threads launch the commands. The daemon
keeps manifest.json; the driver only ends its turn (`sweep_end`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runnerd.cli import attempts, launcher
from runnerd.cli.attempts import Launch, run_once
from runnerd.cli.launcher import KILL_AFTER, Launcher, on_signals
from runnerd_client.cells import substitute
from runnerd_client.client import Cell, Client
from runnerd_client.connection import DaemonUnavailable
from runnerd_client.protocol import ErrorCode, Get, RunnerdError
from runnerd_client.sweep_engine import Engine, Listener
from runnerd_client.sweep_model import (
    Attempt,
    CellOutcome,
    PlannedCell,
    Stop,
    SweepOptions,
    SweepResult,
)
from runnerd_client.sweep_record import daemon_connection, end_turn, registry_lookup

SWEEP_ENV, CELL_ENV = "RUNNERD_SWEEP_ID", "RUNNERD_CELL"
END_PATIENCE = 60.0


def cell_launch(sweep: dict[str, Any], cell: PlannedCell, resume: bool) -> Launch:
    """The `exec` of one cell: the spec's command with the cell's params put in."""
    spec = sweep["spec"]
    return Launch(
        command=substitute(spec["command"], cell.params),
        experiment=sweep["experiment"],
        variation=cell.variation,
        params=cell.params,
        cwd=spec["cwd"],
        env={SWEEP_ENV: sweep["sweep_id"], CELL_ENV: str(cell.index)},
        timeout=spec.get("timeout"),
        memory=spec.get("memory"),
        resume=resume,
    )


class Launched:
    """The engine's executor for commands: attempts launched on `jobs` threads."""

    def __init__(self, client: Client, sweep: dict[str, Any], options: SweepOptions) -> None:
        self.client, self.sweep, self.options = client, sweep, options
        self.launcher = Launcher()
        self.slots = options.jobs
        self.todo: queue.SimpleQueue[Attempt | None] = queue.SimpleQueue()
        self.done: queue.SimpleQueue[CellOutcome] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._work, name=f"cell-worker-{i}", daemon=True)
            for i in range(options.jobs)
        ]
        for thread in self.threads:
            thread.start()

    def start(self, attempt: Attempt) -> None:
        self.todo.put(attempt)

    def wait(self, timeout: float) -> CellOutcome | None:
        try:
            return self.done.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self, why: Stop) -> None:
        """TERM every running command, KILL it KILL_AFTER later; start no more."""
        self.launcher.stop_all(
            launcher.Stop(why.failure_class, why.message, why.signum, why.cause), KILL_AFTER
        )

    def close(self) -> None:
        for _ in self.threads:
            self.todo.put(None)
        for thread in self.threads:
            thread.join()

    def _work(self) -> None:
        while (attempt := self.todo.get()) is not None:
            try:
                outcome = self._attempt(attempt)
            except Exception as exc:  # the engine waits for every attempt it started
                outcome = CellOutcome(
                    attempt.cell.index,
                    attempt.cell.params,
                    "failed",
                    error=f"{type(exc).__name__}: {exc}",
                    exception=exc,
                )
            self.done.put(outcome)

    def _attempt(self, attempt: Attempt) -> CellOutcome:
        cell = attempt.cell
        how = attempts.Attempt(
            self.launcher,
            echo=False,
            retry_of=attempt.retry_of,
            cell=Cell(
                self.options.sweep_id,
                cell.index,
                attempt.claim_after,
                replication=self.options.replication,
            ),
        )
        try:
            done = run_once(self.client, cell_launch(self.sweep, cell, self.options.resume), how)
        except RunnerdError as exc:
            if exc.code != ErrorCode.CONFLICT:
                raise
            return CellOutcome(cell.index, cell.params, "taken", error=exc.message)
        run_id = done.run.run_id
        if done.succeeded:
            return CellOutcome(cell.index, cell.params, "succeeded", run_id)
        record = fetch_run(self.client, run_id) or {}  # to show the failure as it ends
        abandoned = done.interrupted or record.get("state") == "failed_abandoned"
        return CellOutcome(
            cell.index,
            cell.params,
            "abandoned" if abandoned else "failed",
            run_id,
            failure=record.get("failure"),
            diagnosis=done.run.diagnosis,
            stderr_tail=done.stderr_tail,
        )


def fetch_run(client: Client, run_id: str) -> dict[str, Any] | None:
    """A run as the daemon has it now (None while the daemon is away)."""
    reply = client.ask(Get(run=run_id)) or {}
    run: dict[str, Any] | None = reply.get("run") if reply.get("ok") else None
    return run


class Progress(Listener):
    """A line per finished cell (`say`), and a progress line to redraw (`draw`)."""

    def __init__(self, total: int, say: Callable[[str], None], draw: Callable[[str], None]) -> None:
        self.total, self.say, self.draw = total, say, draw
        self.started_at = time.monotonic()
        self.live: set[int] = set()  # cells started and not ended (a retry waiting too)
        self.succeeded = self.finished = 0

    def started(self, attempt: Attempt) -> None:
        self.live.add(attempt.cell.index)

    def ended(self, outcome: CellOutcome) -> None:
        self.live.discard(outcome.index)
        self.finished += 1
        self.succeeded += outcome.state == "succeeded"
        self.say(line(outcome))
        self.tick()

    def tick(self) -> None:
        self.draw(progress_line(self))


@dataclass
class Turn:
    """How a driver's turn went: its outcomes, the runs their attempts followed, why it
    stopped (a signal), and the cell fail_fast stopped at."""

    outcomes: list[CellOutcome]
    followed: dict[int, str | None]
    interrupted: launcher.Stop | None
    first_failure: CellOutcome | None


def run_turn(
    client: Client,
    sweep: dict[str, Any],
    options: SweepOptions,
    planned: list[PlannedCell],
    listener: Listener,
) -> Turn:
    """Run the planned cells' commands; SIGINT or SIGTERM stops them and starts no more."""
    lookup = None if options.replication else registry_lookup(options.sweep_id, client.socket_path)
    engine = Engine(options, Launched(client, sweep, options), listener, lookup)
    received: list[launcher.Stop] = []

    def on_signal(signum: int) -> None:
        stop = launcher.Stop.received(signum)
        received.append(stop)
        engine.stop(Stop(stop.failure_class, stop.message, stop.cause, stop.signum))

    with on_signals(on_signal):
        outcomes = engine.run(planned)
    first = next((o for o in outcomes if o.state == "failed"), None)
    return Turn(
        outcomes,
        engine.followed,
        received[0] if received else None,
        first if options.fail_fast else None,
    )


class NotRecorded(Exception):
    """The daemon stayed away: the turn's cells ran, its end is not recorded."""


def drive(
    socket: Path | None,
    sweep: dict[str, Any],
    options: SweepOptions,
    planned: list[PlannedCell],
    listener: Listener,
) -> tuple[Turn, SweepResult]:
    """Run a turn and end it. If the daemon went away meanwhile, the cells ran all the same
    (their events spooled): wait for it to be back and to have every event first."""
    client = Client(socket)
    turn = run_turn(client, sweep, options, planned, listener)
    try:
        if not client.drain(END_PATIENCE):
            raise DaemonUnavailable(f"runnerd was unreachable for {END_PATIENCE:g} s")
        with daemon_connection(socket) as conn:
            result = end_turn(
                conn,
                options,
                turn.outcomes,
                turn.followed,
                interrupted=turn.interrupted is not None,
            )
    except (RunnerdError, DaemonUnavailable) as exc:
        raise NotRecorded(str(exc)) from exc
    return turn, result


def with_latest(cell: dict[str, Any]) -> PlannedCell:
    """Plan a known cell as the attempt after its latest one, under its recorded name."""
    return PlannedCell.recorded(cell)


def failure_text(outcome: CellOutcome) -> str:
    failure = outcome.failure
    return (
        f"{failure.get('failure_class', '?')}: {failure.get('message', '')}"
        if failure
        else outcome.error or ""
    )


def stderr_text(outcome: CellOutcome) -> str:
    failure = outcome.failure or {}
    return failure.get("traceback") or outcome.stderr_tail.decode("utf-8", "replace")


def line(outcome: CellOutcome) -> str:
    """One finished cell, as a plain line."""
    note = "" if outcome.state == "succeeded" else f" ({failure_text(outcome)})"
    return (
        f"cell {outcome.index} {outcome.variation}: {outcome.state}"
        f" run {outcome.run_id or '-'}{note}"
    )


def progress_line(progress: Progress) -> str:
    done, ended, running = progress.succeeded, progress.finished, len(progress.live)
    left = progress.total - ended - running
    elapsed = time.monotonic() - progress.started_at
    eta = elapsed / ended * (progress.total - ended) if ended else None
    return (
        f"{done} done, {ended - done} failed, {running} running, {left} left,"
        f" {_clock(elapsed)} elapsed" + (f", ETA {_clock(eta)}" if eta is not None else "")
    )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
        if minutes >= 60
        else f"{minutes}:{secs:02d}"
    )


def on_dask(
    address: str, sweep: dict[str, Any], options: SweepOptions, planned: list[PlannedCell]
) -> SweepResult:
    """The cells' commands as tasks of the Dask cluster at `address`, each recorded by the
    worker plugin in its node's daemon. Raises SweepFailed under fail_fast, and
    ImportError without the dask extra."""
    from distributed import Client as DaskClient

    from runnerd_client.dask import RunnerdWorkerPlugin
    from runnerd_client.dask_commands import CommandCell
    from runnerd_client.sweep import drive as drive_cells

    spec = sweep["spec"]
    client = DaskClient(address)  # type: ignore[no-untyped-call]
    try:
        client.register_plugin(RunnerdWorkerPlugin(experiment=sweep["experiment"]))
        cell = CommandCell(tuple(spec["command"]), spec["cwd"], spec.get("timeout"))
        return drive_cells(options, planned, cell, client)
    finally:
        client.close()  # type: ignore[no-untyped-call]
