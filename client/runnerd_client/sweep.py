"""`rd.sweep`: a Python function over a list of cells, each call a tracked run.

    result = rd.sweep("lr-sweep", [{"lr": 0.1}, {"lr": 0.01}], train, jobs=2)

The sweep is stored in the daemon (SPEC §8), which writes its manifest.json; each cell
is claimed there before it runs, so `rd.resume_sweep` (or two of them) runs only the
cells whose latest attempt did not succeed, each from its last checkpoint
(`rd.current_run().resume_checkpoint`). With jobs > 1 the cells run in forked worker
processes; under fail_fast the first failure stops the others (failed_abandoned,
cause fail_fast) and is re-raised once the manifest is written.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runnerd_client import paths
from runnerd_client.cells import differences, variation
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import (
    ErrorCode,
    RunnerdError,
    SweepCells,
    SweepCreate,
    SweepEnd,
    SweepGet,
    SweepPolicy,
    SweepStart,
    SweepStatus,
)
from runnerd_client.run import ACTIVE, Cell, Client, Terminated, backoff_delay, worth_retrying

PAGE = 5000


class FailFast(Terminated):
    """Raised in a worker's running cell when another cell failed under fail_fast."""

    failure_class = "FailFast"
    message = "stopped by fail_fast: another cell failed"
    cause = "fail_fast"


@dataclass
class CellOutcome:
    """How one cell ended in this call: succeeded, failed, abandoned, skipped or taken
    (claimed by another driver of the sweep)."""

    index: int
    params: dict[str, Any]
    state: str
    run_id: str | None = None
    attempts: int = 0
    value: Any = None
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)

    @property
    def variation(self) -> str:
        return variation(self.params)


@dataclass
class SweepResult:
    """The outcomes of this call, the whole sweep's cells summary, and its manifest."""

    sweep_id: str
    outcomes: list[CellOutcome]
    summary: dict[str, int]
    manifest: Path | None
    status: str

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.state == "failed"]


@dataclass(frozen=True)
class SweepOptions:
    """How one turn of a sweep runs its cells (`drive`)."""

    experiment: str
    sweep_id: str
    policy: str
    jobs: int
    retries: int
    backoff: float
    retry_on: str
    resume: bool
    executor: Any = None


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def sweep(experiment: str, cells: Iterable[dict[str, Any]], fn: Callable[..., Any], *,
          failure_policy: str = SweepPolicy.FAIL_FAST, jobs: int = 1, retries: int = 0,
          backoff: float = 2.0, retry_on: str = "retryable",
          folder: str | Path | None = None, executor: Any = None) -> SweepResult:
    """Call `fn(**params)` for each cell as a tracked run of `experiment`; see the module.

    `executor`, a `distributed.Client`, runs the cells on a Dask cluster instead (its
    workers need `RunnerdWorkerPlugin`; see `runnerd_client.dask`).
    """
    cells = [dict(c) for c in cells]
    spec = {"kind": "python", "function": _name(fn), "cells": cells, "jobs": jobs,
            "retries": retries, "backoff": backoff, "retry_on": retry_on}
    sweep_id = new_run_id()
    with daemon_connection() as conn:
        conn.call(SweepCreate(key=new_key(), sweep_id=sweep_id, experiment=experiment,
                              spec=spec, failure_policy=str(failure_policy),
                              folder=str(Path(folder).resolve()) if folder else None))
    options = SweepOptions(experiment, sweep_id, str(failure_policy), jobs, retries, backoff,
                       retry_on, resume=False, executor=executor)
    return drive(options, [(i, c, None) for i, c in enumerate(cells)], fn)


def resume_sweep(sweep_id: str, fn: Callable[..., Any], *, jobs: int | None = None,
                 failure_policy: str | None = None, executor: Any = None) -> SweepResult:
    """Run the cells of a stored sweep whose latest attempt did not succeed, each resumed
    from its last checkpoint; a function other than the stored one is refused."""
    with daemon_connection() as conn:
        stored = conn.call(SweepGet(sweep=sweep_id))["sweep"]
        changed = differences(stored["spec"], {"function": _name(fn)})
        if changed:
            raise RunnerdError(ErrorCode.CONFLICT, "not the stored sweep: " + "; ".join(changed))
        conn.call(SweepStart(key=new_key(), sweep_id=stored["sweep_id"]))
        planned = [(c["index"], c["params"], c["run_id"])
                   for c in sweep_cells(conn, stored["sweep_id"], unfinished=True)]
    spec = stored["spec"]
    options = SweepOptions(stored["experiment"], stored["sweep_id"],
                       failure_policy or stored["failure_policy"], jobs or spec["jobs"],
                       spec["retries"], spec["backoff"], spec["retry_on"], resume=True,
                       executor=executor)
    return drive(options, planned, fn)


class daemon_connection:  # noqa: N801  (used as `with daemon_connection() as conn`)
    """A direct connection for the sweep's own requests: they need the daemon."""

    def __enter__(self) -> Connection:
        self.conn = Connection(paths.socket_path())
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def sweep_cells(conn: Connection, sweep_id: str,
                unfinished: bool = False) -> Iterator[dict[str, Any]]:
    """A sweep's cells from the daemon, a page at a time."""
    after = -1
    while True:
        page = conn.call(SweepCells(sweep=sweep_id, after=after, limit=PAGE,
                                    unfinished=unfinished))
        yield from page["cells"]
        if page["next"] is None:
            return
        after = page["next"]


Planned = tuple[int, dict[str, Any], str | None]  # index, params, the attempt it follows


def drive(options: SweepOptions, planned: list[Planned], fn: Callable[..., Any]) -> SweepResult:
    """Run the cells, end the turn (the manifest is written then), and under fail_fast
    re-raise the first failure."""
    outcomes: list[CellOutcome] = []
    status = SweepStatus.INTERRUPTED
    try:
        outcomes = _runner(options)(options, planned, fn)
        ran = {o.index for o in outcomes}
        outcomes += [CellOutcome(i, p, "skipped") for i, p, _ in planned if i not in ran]
        status = SweepStatus.FAILED if any(o.state != "succeeded" for o in outcomes) \
            else SweepStatus.SUCCEEDED
    finally:
        result = _end(options, outcomes, status)
    first = next((o for o in outcomes if o.state == "failed"), None)
    if options.policy == SweepPolicy.FAIL_FAST and first is not None:
        raise first.exception or RuntimeError(first.error)
    return result


def _runner(options: SweepOptions) -> Callable[[SweepOptions, list[Planned], Callable[..., Any]],
                                          list[CellOutcome]]:
    if options.executor is not None:
        from runnerd_client.dask import run_on_dask
        return run_on_dask
    return _in_process if options.jobs == 1 else _in_workers


def _end(options: SweepOptions, outcomes: list[CellOutcome], status: str) -> SweepResult:
    stopped = options.policy == SweepPolicy.FAIL_FAST and \
        any(o.state == "failed" for o in outcomes)
    with daemon_connection() as conn:
        summary = conn.call(SweepGet(sweep=options.sweep_id))["sweep"]["cells_summary"]
        if status == SweepStatus.SUCCEEDED and summary["succeeded"] != summary["total"]:
            status = SweepStatus.FAILED  # a resume that finished its part of a failed sweep
        ended = conn.call(SweepEnd(key=new_key(), sweep_id=options.sweep_id, status=status,
                                   skip=stopped))
        stored = conn.call(SweepGet(sweep=options.sweep_id))["sweep"]
        if any(o.run_id is None and o.state not in ("skipped", "taken") for o in outcomes):
            _fill_from_registry(outcomes, sweep_cells(conn, options.sweep_id, unfinished=False))
    manifest = Path(ended["manifest"]) if ended.get("manifest") else None
    return SweepResult(options.sweep_id, sorted(outcomes, key=lambda o: o.index),
                       stored["cells_summary"], manifest, stored["status"])


def _fill_from_registry(outcomes: list[CellOutcome], cells: Iterable[dict[str, Any]]) -> None:
    """Cells run elsewhere (on Dask) come back without their run: the registry has it."""
    by_index = {o.index: o for o in outcomes}
    for cell in cells:
        outcome = by_index.get(cell["index"])
        if outcome is None or outcome.run_id is not None:
            continue
        outcome.run_id = cell["run_id"]
        if outcome.state == "skipped" and cell["state"] == "abandoned":
            outcome.state = "abandoned"  # it was running when fail_fast cancelled it


def cell_states(sweep_id: str, index: int, settled: bool = False,
                timeout: float = 10.0) -> dict[str, Any]:
    """One cell as the registry has it; `settled` waits (a while) for its latest attempt
    to have ended, for a worker reports its tasks' ends on its own time."""
    deadline = time.monotonic() + timeout
    with daemon_connection() as conn:
        while True:
            cells = conn.call(SweepCells(sweep=sweep_id, after=index - 1, limit=1))["cells"]
            cell: dict[str, Any] = cells[0] if cells else {}
            if not settled or cell.get("state") != "running" or time.monotonic() > deadline:
                return cell
            time.sleep(0.05)


def _in_process(options: SweepOptions, planned: list[Planned],
                fn: Callable[..., Any]) -> list[CellOutcome]:
    from runnerd_client import connect

    outcomes = []
    for index, params, after in planned:
        outcome = run_cell(connect(), options, index, params, after, fn)
        outcomes.append(outcome)
        if outcome.state == "failed" and options.policy == SweepPolicy.FAIL_FAST:
            break
    return outcomes


def run_cell(client: Client, options: SweepOptions, index: int, params: dict[str, Any],
             after: str | None, fn: Callable[..., Any]) -> CellOutcome:
    """One cell: attempts until one succeeds or retries run out (as `rd.retrying`)."""
    retry_of, attempts = None, 0
    while True:
        try:
            run = client.run(options.experiment, variation(params), params=params,
                             retry_of=retry_of, resume=options.resume,
                             cell=Cell(options.sweep_id, index, after))
        except RunnerdError as exc:
            return CellOutcome(index, params, "taken", attempts=attempts, error=exc.message)
        attempts += 1
        token = ACTIVE.set(run)
        try:
            with run:
                value = _STOP.call(fn, params)
            return CellOutcome(index, params, "succeeded", run.run_id, attempts, value)
        except FailFast as exc:
            return CellOutcome(index, params, "abandoned", run.run_id, attempts,
                               error=exc.message)
        except Exception as exc:
            if attempts > options.retries or not worth_retrying(run.diagnosis,
                                                                options.retry_on):
                return CellOutcome(index, params, "failed", run.run_id, attempts,
                                   error=f"{type(exc).__name__}: {exc}", exception=exc)
        finally:
            ACTIVE.reset(token)
        time.sleep(backoff_delay(options.backoff, attempts))
        retry_of = after = run.run_id


class _Stop:
    """fail_fast's SIGTERM in a worker: raised inside the cell's function only, so a cell
    being created or ended is never cut in half (it stops at its function's start)."""

    def __init__(self) -> None:
        self.requested = False
        self.in_body = False

    def handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if self.in_body:
            raise FailFast()

    def call(self, fn: Callable[..., Any], params: dict[str, Any]) -> Any:
        if self.requested:
            raise FailFast()
        self.in_body = True
        try:
            return fn(**params)
        finally:
            self.in_body = False


_STOP = _Stop()


def _worker(options: SweepOptions, fn: Callable[..., Any], planned: list[Planned], taken: Any,
            done: Any, stop: Any) -> None:
    """A forked worker: take the next planned cell (`taken` counts those taken by all the
    workers) until there are none or the sweep stops."""
    from runnerd_client import connect

    signal.signal(signal.SIGTERM, _STOP.handle)
    try:
        while not stop.is_set() and not _STOP.requested:
            with taken.get_lock():
                position = taken.value
                taken.value += 1
            if position >= len(planned):
                break
            index, params, after = planned[position]
            outcome = run_cell(connect(), options, index, params, after, fn)
            if outcome.state == "failed" and options.policy == SweepPolicy.FAIL_FAST:
                stop.set()  # before the parent hears of it: this worker takes no next cell
            done.put(_portable(outcome))
    except (FailFast, KeyboardInterrupt):
        pass
    finally:
        connect().drain(10.0)
        done.put(None)


def _portable(outcome: CellOutcome) -> CellOutcome:
    """An outcome that pickles: an unpicklable value or exception becomes its text."""
    try:
        pickle.dumps(outcome)
        return outcome
    except Exception:
        text = "".join(traceback.format_exception(outcome.exception)) \
            if outcome.exception else None
        return CellOutcome(outcome.index, outcome.params, outcome.state, outcome.run_id,
                           outcome.attempts, None, outcome.error,
                           RuntimeError(text or outcome.error) if outcome.exception else None)


def _in_workers(options: SweepOptions, planned: list[Planned],
                fn: Callable[..., Any]) -> list[CellOutcome]:
    context = multiprocessing.get_context("fork")
    taken, done, stop = context.Value("q", 0), context.Queue(), context.Event()
    workers = [context.Process(target=_worker, args=(options, fn, planned, taken, done, stop),
                               daemon=True) for _ in range(min(options.jobs, len(planned)))]
    for worker in workers:
        worker.start()
    outcomes: list[CellOutcome] = []
    try:
        for outcome in _results(done, workers):
            outcomes.append(outcome)
            if outcome.state == "failed" and options.policy == SweepPolicy.FAIL_FAST \
                    and not stop.is_set():
                stop.set()
                _signal_all(workers, signal.SIGTERM)
    except BaseException:
        stop.set()
        _signal_all(workers, signal.SIGINT)  # interrupted, as the parent was
        raise
    finally:
        for worker in workers:
            worker.join()
    return outcomes


def _results(done: Any, workers: list[Any]) -> Iterator[CellOutcome]:
    """Each outcome the workers send, until every worker said it is done (None) or died."""
    finished = 0
    while finished < len(workers):
        try:
            outcome = done.get(timeout=0.5)
        except queue.Empty:
            if not any(w.is_alive() for w in workers):
                return  # a worker died without a word; what it sent has been read
            continue
        if outcome is None:
            finished += 1
        else:
            yield outcome


def _signal_all(workers: list[Any], signum: int) -> None:
    for worker in workers:
        if worker.pid is not None and worker.is_alive():
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass
