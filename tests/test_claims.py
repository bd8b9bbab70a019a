"""The claim and resume rules of `create` (runnerd.handlers.claims), against a real registry
file: which earlier attempt a new one follows, and when it may."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runnerd.handlers.claims import followed, recorded_variation
from runnerd.registry import NewRun, NewSweep, RunRow, Store
from runnerd.registry.schema import migrate
from runnerd_client.protocol import Create, RunnerdError, State

NOW = 1_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    conn = sqlite3.connect(tmp_path / "registry.sqlite3", isolation_level=None)
    migrate(conn)
    try:
        yield Store(conn)
    finally:
        conn.close()


def attempt(
    store: Store,
    run_id: str,
    state: State,
    *,
    variation: str = "x=1",
    params: dict[str, Any] | None = None,
    sweep: bool = False,
    token: str | None = None,
) -> RunRow:
    """A run of experiment `e` in `state` (as cell 0 of sweep S1 with `sweep`)."""
    store.runs.create(
        NewRun(
            run_id=run_id,
            experiment="e",
            variation=variation,
            params_json=json.dumps(params or {"x": 1}),
            tags_json="{}",
            created_at=NOW,
            sweep_id="S1" if sweep else None,
            cell=0 if sweep else None,
            claim_token=token,
        ),
        "test",
    )
    if sweep:
        store.sweeps.claim_cell("S1", 0, run_id)
    row = store.runs.require(run_id)
    if state != State.PENDING:
        store.runs.set_state(row, state, at=NOW, cause="test", source="test")
    return store.runs.require(run_id)


def sweep(store: Store, params: dict[str, Any] | None = None, name: str = "x=1") -> None:
    """Sweep S1 of experiment `e`, its one cell recorded with `params` named `name`."""
    store.sweeps.create(
        NewSweep(
            sweep_id="S1",
            experiment="e",
            failure_policy="fail_fast",
            spec_json="{}",
            folder="/tmp/S1",
            driver_pid=1,
            driver_start=None,
            created_at=NOW,
        ),
        [(0, json.dumps(params or {"x": 1}), name)],
    )


def create(run_id: str = "NEW", **fields: Any) -> Create:
    cell = {"sweep_id": "S1", "cell": 0} if fields.pop("cell", True) else {}
    defaults = {"experiment": "e", "variation": "x=1", "params": {"x": 1}}
    return Create(key=f"k-{run_id}", run_id=run_id, **{**defaults, **cell, **fields})


def conflict(store: Store, req: Create) -> str:
    with pytest.raises(RunnerdError) as caught:
        followed(store, req, NOW)
    assert caught.value.code == "conflict", caught.value
    return str(caught.value.message)


def test_a_cell_never_attempted_is_claimed_by_the_attempt_planned_after_none(store: Store) -> None:
    sweep(store)
    assert followed(store, create(), NOW) is None
    assert "was claimed meanwhile" in conflict(store, create(claim_after="A1"))


def test_a_cell_is_claimed_only_after_its_latest_attempt(store: Store) -> None:
    sweep(store)
    attempt(store, "A1", State.FAILED_CRASH, sweep=True)
    assert "claimed meanwhile by run A1" in conflict(store, create())
    assert "claimed meanwhile by run A1" in conflict(store, create(claim_after="OTHER"))
    assert followed(store, create(claim_after="A1"), NOW) is None  # no resume asked
    resumed = followed(store, create(claim_after="A1", resume=True), NOW)
    assert resumed is not None and resumed.run_id == "A1"


@pytest.mark.parametrize("state", [State.PENDING, State.RUNNING])
def test_a_live_attempt_holds_its_cell(store: Store, state: State) -> None:
    sweep(store)
    attempt(store, "A1", state, sweep=True)
    message = conflict(store, create(claim_after="A1"))
    assert "held by live attempt 1 (run A1" in message and state.value in message


def test_a_lost_attempt_is_superseded_by_the_one_that_takes_its_cell_over(store: Store) -> None:
    sweep(store)
    attempt(store, "A1", State.LOST, sweep=True)
    followed(store, create(claim_after="A1"), NOW)
    lost = store.runs.require("A1")
    failure = store.failures.get("A1")
    assert lost.state == State.FAILED_ABANDONED
    assert failure is not None and failure.failure_class == "Superseded"


def test_the_same_task_dispatched_again_follows_its_earlier_dispatch(store: Store) -> None:
    sweep(store)
    attempt(store, "A1", State.FAILED_CRASH, sweep=True, token="task-0")
    assert followed(store, create(claim_token="task-0"), NOW) is None
    assert "claimed meanwhile" in conflict(store, create(claim_token="task-9"))
    assert "claimed meanwhile" in conflict(store, create(tags={"dask_key": "task-0"}))


def test_a_live_attempt_of_the_same_task_still_holds_its_cell(store: Store) -> None:
    sweep(store)
    attempt(store, "A1", State.RUNNING, sweep=True, token="task-0")
    assert "held by live attempt" in conflict(store, create(claim_token="task-0"))


def test_a_cell_is_claimed_only_for_its_own_experiment_and_variation(store: Store) -> None:
    sweep(store)
    with pytest.raises(RunnerdError) as caught:
        followed(store, create(variation="x=2"), NOW)
    assert caught.value.code == "bad_request"
    assert "cell 0 of sweep S1 is e/x=1" in caught.value.message


def test_a_cell_recorded_with_keys_sorted_is_claimed_and_resumed_in_any_key_order(
    store: Store,
) -> None:
    """An older registry named cells with their keys sorted: a claim naming the params in
    their own order (or sorted) is still the cell's, and is recorded under its name."""
    params = {"x": 1, "lr": 0.1}
    sweep(store, params, "lr=0.1,x=1")
    attempt(store, "A1", State.FAILED_CRASH, variation="lr=0.1,x=1", params=params, sweep=True)
    for name, given in [("x=1,lr=0.1", params), ("lr=0.1,x=1", {"lr": 0.1, "x": 1})]:
        req = create(variation=name, params=given, claim_after="A1", resume=True)
        resumed = followed(store, req, NOW)
        assert resumed is not None and resumed.run_id == "A1"
        assert recorded_variation(store, req) == "lr=0.1,x=1"
    with pytest.raises(RunnerdError) as caught:
        followed(store, create(variation="x=2,lr=0.1", params={"x": 2, "lr": 0.1}), NOW)
    assert "cell 0 of sweep S1 is e/lr=0.1,x=1" in caught.value.message
    assert recorded_variation(store, create(cell=False, variation="mine")) == "mine"


def test_a_resume_follows_the_latest_attempt_of_its_variation(store: Store) -> None:
    attempt(store, "A1", State.FAILED_CRASH)
    attempt(store, "A2", State.FAILED_ABANDONED)
    resumed = followed(store, create(cell=False, resume=True), NOW)
    assert resumed is not None and resumed.run_id == "A2"


def test_a_succeeded_attempt_is_not_resumed(store: Store) -> None:
    attempt(store, "A1", State.SUCCEEDED)
    assert followed(store, create(cell=False, resume=True), NOW) is None


def test_a_resume_with_other_params_is_refused_naming_them(store: Store) -> None:
    attempt(store, "A1", State.FAILED_CRASH, params={"x": 1, "lr": 0.1})
    message = conflict(store, create(cell=False, resume=True))
    assert "cannot resume run A1: params changed: lr" in message


def test_a_resume_waits_for_a_live_attempt(store: Store) -> None:
    attempt(store, "A1", State.RUNNING)
    assert "e/x=1 is held by live attempt 1 (run A1, running)" in conflict(
        store, create(cell=False, resume=True)
    )
