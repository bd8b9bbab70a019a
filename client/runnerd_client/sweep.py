"""`rd.sweep`: a Python function over a list of cells, each call a tracked run.

    result = rd.sweep("lr-sweep", [{"lr": 0.1}, {"lr": 0.01}], train, jobs=2)

The sweep is stored in the daemon (SPEC §8), which writes its manifest.json; each cell
is claimed there before it runs, so `rd.resume_sweep` (or two of them) runs only the
cells whose latest attempt did not succeed, each from its last checkpoint
(`rd.current_run().resume_checkpoint`). The cells run in this process (jobs=1), in forked
worker processes (jobs>1) or on a Dask cluster (`executor=`), all through one engine
(`sweep_engine`): under fail_fast the first failure stops the running cells
(failed_abandoned, cause fail_fast), and `SweepFailed` is raised once the manifest is
written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runnerd_client.cells import differences
from runnerd_client.connection import Connection
from runnerd_client.fields import Jobs, JsonMap, check_argument, check_callable
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import (
    ErrorCode,
    RunnerdError,
    SweepCreate,
    SweepGet,
    SweepPolicy,
    SweepStart,
)
from runnerd_client.sweep_engine import Engine, Executor
from runnerd_client.sweep_model import (
    CellOutcome,
    PlannedCell,
    SweepFailed,
    SweepOptions,
    SweepResult,
)
from runnerd_client.sweep_record import (
    daemon_connection,
    end_turn,
    registry_lookup,
    sweep_cells,
)

if TYPE_CHECKING:
    from distributed import Client as DaskClient

__all__ = ["CellOutcome", "SweepFailed", "SweepResult", "resume_sweep", "sweep", "sweep_cells"]


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def sweep(
    experiment: str,
    cells: Iterable[dict[str, Any]],
    fn: Callable[..., Any],
    *,
    failure_policy: str = SweepPolicy.FAIL_FAST,
    jobs: int = 1,
    retries: int = 0,
    backoff: float = 2.0,
    retry_on: str = "retryable",
    folder: str | Path | None = None,
    executor: DaskClient | None = None,
) -> SweepResult:
    """Call `fn(**params)` for each cell as a tracked run of `experiment`; see the module.

    `executor`, a `distributed.Client`, runs the cells on a Dask cluster instead (its
    workers need `RunnerdWorkerPlugin`; see `runnerd_client.dask`). A wrong argument (cells
    that are not dicts of plain JSON, jobs=0, retry_on="x") raises TypeError or ValueError
    before anything is stored or run.
    """
    check_callable("fn", fn)
    sweep_id = new_run_id()
    options = SweepOptions(experiment, sweep_id, failure_policy, jobs, retries, backoff, retry_on)
    params = cell_params(cells)
    spec = {
        "kind": "python",
        "function": _name(fn),
        "cells": params,
        "jobs": jobs,
        "retries": retries,
        "backoff": backoff,
        "retry_on": retry_on,
    }
    with daemon_connection() as conn:
        conn.call(
            SweepCreate(
                key=new_key(),
                sweep_id=sweep_id,
                experiment=experiment,
                spec=spec,
                failure_policy=failure_policy,
                folder=str(Path(folder).resolve()) if folder else None,
            )
        )
    return drive(options, [PlannedCell(i, c) for i, c in enumerate(params)], fn, executor)


def cell_params(cells: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each cell's params, a dict of plain JSON; TypeError or ValueError naming the first
    cell that is not one."""
    if isinstance(cells, str | bytes | Mapping) or not isinstance(cells, Iterable):
        raise TypeError(
            "cells must be an iterable of dicts of params, not "
            f"{type(cells).__name__} {cells!r:.60}"
        )
    params = []
    for index, cell in enumerate(cells):
        name = f"cells[{index}]"
        if not isinstance(cell, Mapping):
            raise TypeError(
                f"{name} must be a dict of params, not {type(cell).__name__} {cell!r:.60}"
            )
        params.append(dict(cell))
        check_argument(name, JsonMap, params[-1])
    return params


def resume_sweep(
    sweep_id: str,
    fn: Callable[..., Any],
    *,
    jobs: int | None = None,
    failure_policy: str | None = None,
    executor: DaskClient | None = None,
) -> SweepResult:
    """Run the cells of a stored sweep whose latest attempt did not succeed, each resumed
    from its last checkpoint; a function other than the stored one is refused."""
    check_callable("fn", fn)
    if jobs is not None:
        check_argument("jobs", Jobs, jobs)
    with daemon_connection() as conn:
        stored = conn.call(SweepGet(sweep=sweep_id))["sweep"]
        changed = differences(stored["spec"], {"function": _name(fn)})
        if changed:
            raise RunnerdError(ErrorCode.CONFLICT, "not the stored sweep: " + "; ".join(changed))
        conn.call(SweepStart(key=new_key(), sweep_id=stored["sweep_id"]))
        planned = unfinished(conn, stored["sweep_id"])
    options = SweepOptions.of(stored, jobs=jobs, policy=failure_policy, resume=True)
    return drive(options, planned, fn, executor)


def unfinished(conn: Connection, sweep_id: str) -> list[PlannedCell]:
    """The cells whose latest attempt did not succeed, each planned after that attempt
    under its recorded name."""
    return [PlannedCell.recorded(c) for c in sweep_cells(conn, sweep_id, unfinished=True)]


def drive(
    options: SweepOptions,
    planned: list[PlannedCell],
    fn: Callable[..., Any],
    dask: DaskClient | None = None,
) -> SweepResult:
    """Run the cells, end the turn (the manifest is written then), and under fail_fast
    raise SweepFailed for the first failure; cells never started are `skipped`."""
    engine = Engine(
        options, _executor(options, planned, fn, dask), lookup=registry_lookup(options.sweep_id)
    )
    interrupted = True
    try:
        engine.run(planned)
        interrupted = False
    finally:
        ran = {o.index for o in engine.outcomes}
        outcomes = engine.outcomes + [
            CellOutcome(c.index, c.params, "skipped", recorded_as=c.recorded_as)
            for c in planned
            if c.index not in ran
        ]
        with daemon_connection() as conn:
            result = end_turn(conn, options, outcomes, engine.followed, interrupted=interrupted)
    first = next((o for o in result.outcomes if o.state == "failed"), None)
    if options.fail_fast and first is not None:
        raise SweepFailed(result, first) from first.exception
    return result


def _executor(
    options: SweepOptions,
    planned: list[PlannedCell],
    fn: Callable[..., Any],
    dask: DaskClient | None,
) -> Executor:
    if dask is not None:
        from runnerd_client.dask_sweep import OnDask  # imports distributed, an extra

        return OnDask(options, dask, fn)
    from runnerd_client.sweep_local import InProcess, Workers  # multiprocessing: 15 ms

    return InProcess(options, fn) if options.jobs == 1 else Workers(options, fn, len(planned))
