"""Executors of Python cells on this machine: in this process (jobs=1) or in forked
worker processes (jobs>1), each attempt one tracked run around `fn(**params)`.

A worker runs the attempts the engine sends it, one at a time, and sends each outcome
back; it decides nothing. To stop it, the engine's process writes why into shared memory
and sends SIGTERM: the worker raises FailFast inside the cell's function only, so a run
being created or ended is never cut in half, and the run ends failed_abandoned with the
stop's class, message and cause.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import pickle
import queue
import signal
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection as Pipe
from multiprocessing.context import ForkProcess
from multiprocessing.queues import Queue
from types import FrameType
from typing import Any, TypeAlias

from runnerd_client.client import Cell, Client
from runnerd_client.exits import Terminated
from runnerd_client.protocol import RunnerdError
from runnerd_client.shared import connect
from runnerd_client.sweep_model import Attempt, CellOutcome, Stop, SweepOptions

STOP_SIZE = 1024  # bytes of shared memory that say why a worker is stopped
DRAIN = 10.0  # seconds a worker waits for the daemon to take its last events


class FailFast(Terminated):
    """Raised in a worker's running cell when the turn stops it (fail_fast)."""

    failure_class = "FailFast"
    message = "stopped by fail_fast: another cell failed"
    cause: str | None = "fail_fast"

    def __init__(self, why: Stop | None = None) -> None:
        super().__init__()
        if why is not None:
            self.failure_class, self.message, self.cause = why.failure_class, why.message, why.cause


def call_cell(
    client: Client, options: SweepOptions, attempt: Attempt, call: Callable[[dict[str, Any]], Any]
) -> CellOutcome:
    """One attempt: a run claiming the cell, around `call(params)`."""
    cell = attempt.cell
    try:
        run = client.run(
            options.experiment,
            cell.variation,
            params=cell.params,
            retry_of=attempt.retry_of,
            resume=options.resume,
            cell=Cell(options.sweep_id, cell.index, attempt.claim_after),
        )
    except RunnerdError as exc:
        return CellOutcome(cell.index, cell.params, "taken", error=exc.message)
    try:
        with run:  # the cell's run is rd.current_run() inside
            value = call(cell.params)
        return CellOutcome(cell.index, cell.params, "succeeded", run.run_id, value=value)
    except FailFast as exc:
        return CellOutcome(cell.index, cell.params, "abandoned", run.run_id, error=exc.message)
    except Exception as exc:
        return CellOutcome(
            cell.index,
            cell.params,
            "failed",
            run.run_id,
            error=f"{type(exc).__name__}: {exc}",
            exception=exc,
            diagnosis=run.diagnosis,
        )


class InProcess:
    """Each attempt in this process, one at a time, when the engine waits for it."""

    slots = 1

    def __init__(self, options: SweepOptions, fn: Callable[..., Any]) -> None:
        self.options, self.fn = options, fn
        self.next: Attempt | None = None

    def start(self, attempt: Attempt) -> None:
        self.next = attempt

    def wait(self, timeout: float) -> CellOutcome | None:
        attempt, self.next = self.next, None
        if attempt is None:
            return None
        return call_cell(connect(), self.options, attempt, lambda params: self.fn(**params))

    def stop(self, why: Stop) -> None:
        """Nothing runs between two waits: nothing to stop."""

    def close(self) -> None:
        """Nothing held."""


class _Stop:
    """The worker's SIGTERM: raised inside the cell's function only."""

    def __init__(self) -> None:
        self.requested = False
        self.in_body = False
        self.why: ctypes.Array[ctypes.c_char] | None = None  # where `Stop` is written

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.in_body:
            raise FailFast(self.reason())

    def reason(self) -> Stop | None:
        text = self.why.raw.rstrip(b"\0") if self.why is not None else b""
        return Stop(**json.loads(text)) if text else None

    def call(self, fn: Callable[..., Any], params: dict[str, Any]) -> Any:
        if self.requested:
            raise FailFast(self.reason())
        self.in_body = True
        try:
            return fn(**params)
        finally:
            self.in_body = False


_STOP = _Stop()


Outcomes: TypeAlias = "Queue[tuple[int, CellOutcome]]"  # (worker number, its outcome)


def _work(
    options: SweepOptions,
    fn: Callable[..., Any],
    number: int,
    inbox: Pipe,
    done: Outcomes,
    why: ctypes.Array[ctypes.c_char],
) -> None:
    """A forked worker: run each attempt sent, until told to end (None) or stopped."""
    signal.signal(signal.SIGTERM, _STOP.handle)
    _STOP.why = why
    try:
        while (attempt := inbox.recv()) is not None:
            outcome = call_cell(connect(), options, attempt, lambda params: _STOP.call(fn, params))
            done.put((number, _portable(outcome)))
    except (FailFast, KeyboardInterrupt, EOFError):
        pass
    finally:
        connect().drain(DRAIN)


def _portable(outcome: CellOutcome) -> CellOutcome:
    """An outcome that pickles: an unpicklable value or exception becomes its text."""
    try:
        pickle.dumps(outcome)
        return outcome
    except Exception:
        text = "".join(traceback.format_exception(outcome.exception)) if outcome.exception else None
        return CellOutcome(
            outcome.index,
            outcome.params,
            outcome.state,
            outcome.run_id,
            error=outcome.error,
            diagnosis=outcome.diagnosis,
            exception=RuntimeError(text or outcome.error) if outcome.exception else None,
        )


@dataclass
class _Worker:
    process: ForkProcess
    inbox: Pipe
    attempt: Attempt | None = None


class Workers:
    """Attempts in forked worker processes, one attempt per worker at a time."""

    def __init__(self, options: SweepOptions, fn: Callable[..., Any], count: int) -> None:
        context = multiprocessing.get_context("fork")
        self.done: Outcomes = context.Queue()
        self.why = context.RawArray(ctypes.c_char, STOP_SIZE)
        self.workers: list[_Worker] = []
        for number in range(max(1, min(options.jobs, count))):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_work, daemon=True, args=(options, fn, number, theirs, self.done, self.why)
            )
            process.start()
            theirs.close()
            self.workers.append(_Worker(process, ours))

    @property
    def slots(self) -> int:
        return sum(w.process.is_alive() or w.attempt is not None for w in self.workers)

    def start(self, attempt: Attempt) -> None:
        worker = next(w for w in self.workers if w.attempt is None and w.process.is_alive())
        worker.attempt = attempt
        worker.inbox.send(attempt)

    def wait(self, timeout: float) -> CellOutcome | None:
        try:
            number, outcome = self.done.get(timeout=timeout)
        except queue.Empty:
            return self._died()
        worker = self.workers[number]
        if worker.attempt is None:
            return None  # already reported as died with it
        worker.attempt = None
        return outcome

    def _died(self) -> CellOutcome | None:
        """The attempt of a worker that died without a word (SIGKILL, a segfault): its run
        is failed by the daemon, which saw the process die."""
        for worker in self.workers:
            attempt = worker.attempt
            if attempt is not None and not worker.process.is_alive():
                worker.attempt = None
                return CellOutcome(
                    attempt.cell.index,
                    attempt.cell.params,
                    "failed",
                    error=f"its worker process died (exit code {worker.process.exitcode})",
                )
        return None

    def stop(self, why: Stop) -> None:
        text = json.dumps(asdict(why)).encode()[:STOP_SIZE]
        self.why.raw = text.ljust(STOP_SIZE, b"\0")
        for worker in self.workers:
            if worker.attempt is not None or why.signum != signal.SIGTERM:
                _signal(worker.process, why.signum)

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker.inbox.send(None)
            except OSError:
                pass  # it is gone already
        for worker in self.workers:
            worker.process.join()
            worker.inbox.close()


def _signal(process: ForkProcess, signum: int) -> None:
    if process.pid is not None and process.is_alive():
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass
