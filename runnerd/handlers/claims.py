"""Which earlier attempt a new one follows, and when it may: claiming a sweep's cell, resuming
an experiment's variation. Pure rules on the store, applied inside `create`'s mutation.

A cell is claimed by the attempt that planned after its latest one (`claim_after`), or by
one carrying the claim token of that latest attempt: a scheduler running the very same task
again (Dask re-dispatches a task whose worker died) follows its earlier dispatch.
"""

from __future__ import annotations

import json
from typing import Any

from runnerd.handlers.common import bad
from runnerd.registry import RunRow, Store
from runnerd.states import Event, end_with_failure, failure_record
from runnerd_client.cells import changed_keys, names_cell
from runnerd_client.protocol import Create, ErrorCode, FailReason, RunnerdError, State


def followed(store: Store, req: Create, at: float) -> RunRow | None:
    """The attempt `req` resumes, if any, once it may take over: the cell's latest attempt
    (for a cell) or the variation's (with `resume`); a succeeded one is not resumed."""
    if req.replicates:
        cell_of(store, req)  # linked to the cell, it claims and resumes nothing
        return None
    previous = (
        claim_cell(store, req, at)
        if req.sweep_id is not None
        else resumable(store, req, at)
        if req.resume
        else None
    )
    if not req.resume or previous is None or previous.state == State.SUCCEEDED:
        return None
    same_params(previous, req.params or {})
    return previous


def claim_cell(store: Store, req: Create, at: float) -> RunRow | None:
    """Check that the cell is the requester's to run (its latest attempt is still the one
    it planned after, or runs the same task, and none is live or succeeded); return that
    latest attempt. A planner plans only cells that did not succeed: one that succeeded
    since (another driver ran it) is not run again."""
    latest = cell_of(store, req)
    row = store.runs.get(latest) if latest else None
    if latest != req.claim_after and not same_task(row, req):
        raise RunnerdError(
            ErrorCode.CONFLICT,
            f"cell {req.cell} of sweep {req.sweep_id} was claimed meanwhile by run {latest}",
        )
    if row is not None:
        take_over(store, row, at, f"cell {req.cell} of sweep {req.sweep_id}")
        if row.state == State.SUCCEEDED:
            raise RunnerdError(
                ErrorCode.CONFLICT,
                f"cell {req.cell} of sweep {req.sweep_id} succeeded meanwhile (run {latest})",
            )
    return row


def cell_of(store: Store, req: Create) -> str | None:
    """The run of the cell's latest attempt, once the cell is known to be the request's
    experiment and variation (its params named in another key order too: `names_cell`)."""
    assert req.sweep_id is not None and req.cell is not None
    sweep = store.sweeps.require(req.sweep_id)
    cell = store.sweeps.cell(req.sweep_id, req.cell)
    if sweep.experiment != req.experiment or not names_cell(
        req.variation, req.params or {}, cell.variation, json.loads(cell.params_json)
    ):
        raise bad(f"cell {req.cell} of sweep {req.sweep_id} is {sweep.experiment}/{cell.variation}")
    return cell.latest_run_id


def recorded_variation(store: Store, req: Create) -> str:
    """The variation a new attempt is recorded under: a cell's attempt under the cell's own
    name, however its client ordered the params, so the cell's attempts count on under
    one name (a sweep recorded with keys sorted keeps them so)."""
    if req.sweep_id is None or req.cell is None:
        return req.variation
    return store.sweeps.cell(req.sweep_id, req.cell).variation


def same_task(latest: RunRow | None, req: Create) -> bool:
    """Whether this attempt runs the very task the latest one ran (the same claim token)."""
    return (
        latest is not None and req.claim_token is not None and latest.claim_token == req.claim_token
    )


def resumable(store: Store, req: Create, at: float) -> RunRow | None:
    """The latest attempt of the experiment and variation, which a resume follows."""
    row = store.runs.latest_attempt(req.experiment, req.variation)
    if row is not None:
        take_over(store, row, at, f"{req.experiment}/{req.variation}")
    return row


def take_over(store: Store, row: RunRow, at: float, what: str) -> None:
    """A new attempt may not start beside a live one; a lost one is given up for it."""
    if row.state in (State.PENDING, State.RUNNING):
        raise RunnerdError(
            ErrorCode.CONFLICT,
            f"{what} is held by live attempt {row.attempt} (run {row.run_id}, {row.state})",
        )
    if row.state == State.LOST:
        record = failure_record(
            "Superseded", "a new attempt took over this lost run", FailReason.ABANDONED, at
        )
        end_with_failure(store, row, Event.CANCEL, record, "superseded")


def same_params(previous: RunRow, params: dict[str, Any]) -> None:
    """A resume runs what the attempt it resumes ran: changed params are a conflict."""
    changed = changed_keys(previous.params(), params)
    if changed:
        raise RunnerdError(
            ErrorCode.CONFLICT,
            f"cannot resume run {previous.run_id}: params changed: {', '.join(changed)}",
        )
