"""The sweep engine's rules on their own: what starts when, retries, and fail_fast.

Every way of running a sweep (in process, forked workers, launched commands, Dask) goes
through this loop; here its executor is a small in-memory one that ends attempts as a
script says, so each rule is checked without processes or a daemon.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from runnerd_client.protocol import SweepPolicy
from runnerd_client.sweep_engine import Engine, Listener
from runnerd_client.sweep_model import Attempt, CellOutcome, PlannedCell, Stop, SweepOptions

RETRYABLE = {"category": "network", "retryable": True}
A_BUG = {"category": "user_code", "retryable": False}


@dataclass
class Scripted:
    """Ends attempts in the order they started: `ends[(cell, attempt number)]` is the state
    and diagnosis (default: succeeded); a cell in `held` runs until it is stopped."""

    slots: int = 2
    ends: dict[tuple[int, int], tuple[str, dict[str, Any] | None]] = field(default_factory=dict)
    held: set[int] = field(default_factory=set)
    known: bool = True  # whether the executor knows each attempt's run and diagnosis
    running: deque[Attempt] = field(default_factory=deque)
    started: list[Attempt] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    most: int = 0
    closed: bool = False

    def start(self, attempt: Attempt) -> None:
        self.running.append(attempt)
        self.started.append(attempt)
        self.most = max(self.most, len(self.running))

    def wait(self, timeout: float) -> CellOutcome | None:
        for attempt in list(self.running):
            if attempt.cell.index in self.held and not self.stops:
                continue
            self.running.remove(attempt)
            return self._end(attempt)
        return None

    def _end(self, attempt: Attempt) -> CellOutcome:
        cell = attempt.cell
        run_id = f"run-{cell.index}-{attempt.number}"
        if cell.index in self.held:
            return CellOutcome(
                cell.index, cell.params, "abandoned", run_id, error=self.stops[0].message
            )
        state, diagnosis = self.ends.get((cell.index, attempt.number), ("succeeded", None))
        if not self.known:
            return CellOutcome(cell.index, cell.params, state)
        return CellOutcome(cell.index, cell.params, state, run_id, diagnosis=diagnosis)

    def stop(self, why: Stop) -> None:
        self.stops.append(why)

    def close(self) -> None:
        self.closed = True


def options(
    policy: str = SweepPolicy.FAIL_FAST, retries: int = 0, retry_on: str = "retryable"
) -> SweepOptions:
    return SweepOptions("e", "S", policy, jobs=2, retries=retries, backoff=0.0, retry_on=retry_on)


def cells(n: int) -> list[PlannedCell]:
    return [PlannedCell(i, {"i": i}) for i in range(n)]


def states(outcomes: list[CellOutcome]) -> dict[int, str]:
    return {o.index: o.state for o in outcomes}


def test_fail_fast_stops_the_running_cells_and_starts_no_other() -> None:
    executor = Scripted(ends={(1, 1): ("failed", A_BUG)}, held={0})
    engine = Engine(options(), executor)
    outcomes = engine.run(cells(5))

    assert executor.stops == [Stop("FailFast", "stopped by fail_fast: cell 1 failed", "fail_fast")]
    assert states(outcomes) == {1: "failed", 0: "abandoned"}
    assert [a.cell.index for a in executor.started] == [0, 1]
    assert executor.closed


def test_continue_on_failure_runs_every_cell_at_most_slots_at_once() -> None:
    executor = Scripted(slots=3, ends={(1, 1): ("failed", A_BUG), (4, 1): ("failed", A_BUG)})
    outcomes = Engine(options(SweepPolicy.CONTINUE_ON_FAILURE), executor).run(cells(8))

    assert states(outcomes) == {i: "failed" if i in (1, 4) else "succeeded" for i in range(8)}
    assert executor.most == 3
    assert not executor.stops


@pytest.mark.parametrize(
    ("diagnosis", "retry_on", "attempts"),
    [(RETRYABLE, "retryable", 3), (A_BUG, "retryable", 1), (A_BUG, "any", 3)],
)
def test_a_failed_attempt_is_retried_only_while_retries_remain_and_a_rerun_may_help(
    diagnosis: dict[str, Any], retry_on: str, attempts: int
) -> None:
    ends = {(0, n): ("failed", diagnosis) for n in (1, 2, 3)}
    executor = Scripted(ends=ends)
    outcomes = Engine(options(retries=2, retry_on=retry_on), executor).run(cells(1))

    assert [(a.number, a.claim_after, a.retry_of) for a in executor.started] == [
        (1, None, None),
        (2, "run-0-1", "run-0-1"),
        (3, "run-0-2", "run-0-2"),
    ][:attempts]
    assert [(o.state, o.attempts) for o in outcomes] == [("failed", attempts)]


def test_fail_fast_acts_after_the_retries_not_before() -> None:
    executor = Scripted(ends={(0, 1): ("failed", RETRYABLE)})
    outcomes = Engine(options(retries=1), executor).run(cells(3))

    assert states(outcomes) == {0: "succeeded", 1: "succeeded", 2: "succeeded"}
    assert not executor.stops


def test_an_attempt_that_ran_elsewhere_is_looked_up_before_its_retry() -> None:
    executor = Scripted(ends={(0, 1): ("failed", None)}, known=False)
    looked: list[int] = []

    def lookup(index: int) -> tuple[str | None, dict[str, Any] | None]:
        looked.append(index)
        return "run-on-a-worker", RETRYABLE

    Engine(options(retries=1), executor, lookup=lookup).run(cells(1))
    assert looked == [0]
    assert executor.started[1].claim_after == "run-on-a-worker"


def test_a_stop_asked_from_a_signal_handler_stops_the_turn() -> None:
    class StopAtFirstEnd(Listener):
        def ended(self, outcome: CellOutcome) -> None:
            engine.stop(Stop("Terminated", "runnerctl received SIGTERM"))

    executor = Scripted(held={1})
    engine = Engine(options(SweepPolicy.CONTINUE_ON_FAILURE), executor, StopAtFirstEnd())
    outcomes = engine.run(cells(4))

    assert [s.failure_class for s in executor.stops] == ["Terminated"]
    assert states(outcomes) == {0: "succeeded", 1: "abandoned"}
    assert len(executor.started) == 2


def test_an_exception_in_the_loop_stops_the_running_attempts_first() -> None:
    class Interrupted(Scripted):
        def wait(self, timeout: float) -> CellOutcome | None:
            raise KeyboardInterrupt

    executor = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        Engine(options(), executor).run(cells(2))
    assert [s.failure_class for s in executor.stops] == ["KeyboardInterrupt"]
    assert executor.closed
