"""The one loop that runs a turn's cells, whatever runs each attempt.

An `Executor` runs attempts: in this process, in forked workers, as launched commands
(runnerctl), or as Dask tasks. The `Engine` alone decides what runs when: at most
`slots` attempts at once, a failed attempt retried (after its backoff) only while
retries remain and the daemon's diagnosis says a rerun may help, and under fail_fast
the first cell that fails after its retries stops every running attempt (failed_abandoned,
cause fail_fast) and starts no other. So no way of running a sweep can differ on these.
"""

from __future__ import annotations

import heapq
import itertools
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from runnerd_client.retries import backoff_delay, worth_retrying
from runnerd_client.sweep_model import Attempt, CellOutcome, PlannedCell, Stop, SweepOptions

TICK = 0.1  # how often the loop looks at a stop asked for from a signal handler


class Executor(Protocol):
    """Runs attempts; the engine calls it from one thread only."""

    @property
    def slots(self) -> int:
        """How many attempts it runs at once."""

    def start(self, attempt: Attempt) -> None:
        """Begin the attempt (or queue it: `wait` may run it)."""

    def wait(self, timeout: float) -> CellOutcome | None:
        """The next attempt to end, or None after `timeout` seconds without one."""

    def stop(self, why: Stop) -> None:
        """Stop every running attempt: each ends abandoned, recorded with `why`."""

    def close(self) -> None:
        """Release what it holds; called once, after the last attempt ended or on an error."""


class Listener:
    """What a turn's caller hears as it goes (runnerctl's progress lines); all no-ops."""

    def started(self, attempt: Attempt) -> None:
        """An attempt began."""

    def ended(self, outcome: CellOutcome) -> None:
        """A cell ended for this turn (after its last attempt)."""

    def tick(self) -> None:
        """Nothing ended for a while."""


Lookup = Callable[[int], tuple[str | None, dict[str, Any] | None]]
"""The registry's view of a cell's latest attempt (its run id and diagnosis), for a failed
attempt whose executor could not know them (it ran elsewhere)."""


class Engine:
    """Runs planned cells through an executor; `stop` may be called from a signal handler."""

    def __init__(
        self,
        options: SweepOptions,
        executor: Executor,
        listener: Listener | None = None,
        lookup: Lookup | None = None,
    ) -> None:
        self.options, self.executor = options, executor
        self.listener = listener or Listener()
        self.lookup = lookup
        self.stopping: Stop | None = None
        self._asked: Stop | None = None
        self._running: dict[int, Attempt] = {}
        self._ready: deque[Attempt] = deque()
        self._later: list[tuple[float, int, Attempt, CellOutcome]] = []
        self._order = itertools.count()
        self.outcomes: list[CellOutcome] = []
        self.followed: dict[int, str | None] = {}  # cell -> the run its last attempt followed

    @property
    def running(self) -> int:
        return len(self._running)

    def stop(self, why: Stop) -> None:
        """Stop the turn: safe from a signal handler (the loop acts on it within TICK)."""
        self._asked = self._asked or why

    def run(self, planned: Iterable[PlannedCell]) -> list[CellOutcome]:
        """Every planned cell's outcome, in the order they ended; cells never started are
        left out. An exception (KeyboardInterrupt) stops the running attempts first."""
        self._ready.extend(Attempt(cell, 1, cell.claim_after) for cell in planned)
        try:
            while self._fill() or self._running:
                outcome = self.executor.wait(self._timeout())
                self._take_asked()
                if outcome is None:
                    self.listener.tick()
                else:
                    self._ended(outcome)
        except BaseException:
            self._halt(Stop("KeyboardInterrupt", "interrupted", signum=signal.SIGINT))
            raise
        finally:
            self.executor.close()
        self._give_up_retries()
        return self.outcomes

    def _fill(self) -> bool:
        """Start what may start now; whether anything is left to start, now or later."""
        self._take_asked()
        if self.stopping is not None or not self.executor.slots:
            return False  # nothing more starts (stopped, or every worker is gone)
        now = time.monotonic()
        while self._later and self._later[0][0] <= now:
            self._ready.append(heapq.heappop(self._later)[2])
        while self._ready and len(self._running) < self.executor.slots:
            attempt = self._ready.popleft()
            self._running[attempt.cell.index] = attempt
            self.executor.start(attempt)
            self.listener.started(attempt)
        return bool(self._ready or self._later)

    def _timeout(self) -> float:
        if self._later and len(self._running) < self.executor.slots:
            return max(0.0, min(TICK, self._later[0][0] - time.monotonic()))
        return TICK

    def _ended(self, outcome: CellOutcome) -> None:
        attempt = self._running.pop(outcome.index)
        outcome.attempts = attempt.number
        outcome.recorded_as = outcome.recorded_as or attempt.cell.recorded_as
        self.followed[outcome.index] = attempt.claim_after
        if outcome.state == "failed" and self.stopping is None:
            retry = self._retry(attempt, outcome)
            if retry is not None:
                delay = backoff_delay(self.options.backoff, attempt.number)
                heapq.heappush(
                    self._later, (time.monotonic() + delay, next(self._order), retry, outcome)
                )
                return
        self.outcomes.append(outcome)
        self.listener.ended(outcome)
        if outcome.state == "failed" and self.options.fail_fast and self.stopping is None:
            self._halt(Stop.fail_fast(outcome.index))

    def _retry(self, attempt: Attempt, outcome: CellOutcome) -> Attempt | None:
        """The next attempt of a failed one, if retries remain and a rerun may help."""
        if attempt.number > self.options.retries:
            return None
        if (outcome.run_id is None or outcome.diagnosis is None) and self.lookup is not None:
            run_id, diagnosis = self.lookup(outcome.index)
            outcome.run_id = outcome.run_id or run_id
            outcome.diagnosis = outcome.diagnosis or diagnosis
        if not worth_retrying(outcome.diagnosis, self.options.retry_on):
            return None
        return attempt.next(outcome.run_id)

    def _take_asked(self) -> None:
        if self._asked is not None and self.stopping is None:
            self._halt(self._asked)

    def _halt(self, why: Stop) -> None:
        if self.stopping is None:
            self.stopping = why
            self.executor.stop(why)

    def _give_up_retries(self) -> None:
        """Cells waiting for a retry when the turn stopped end as their last attempt did."""
        for _, _, _, outcome in sorted(self._later):
            self.outcomes.append(outcome)
            self.listener.ended(outcome)
        self._later.clear()
