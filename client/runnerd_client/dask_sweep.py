"""A sweep's attempts as Dask tasks: `rd.sweep(..., executor=client)` and
`runnerctl sweep run --dask`.

Each attempt is one Dask key, with Dask's own retries off (the engine retries only what
the daemon's diagnosis calls transient) and its future released as soon as its result is
in, so a lost worker never makes Dask silently recompute a finished cell. The worker
plugin makes each attempt's run (claiming its cell) in the worker's node daemon, so this
side learns a failed attempt's run from the registry. Dask cannot interrupt a task's
thread: to stop the running attempts the executor records them failed_abandoned itself,
then cancels their tasks (a cell's command is killed by the plugin; a Python function
runs on, and what it returns is dropped).
"""

from __future__ import annotations

import queue
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dask.base import annotate
from distributed import Client as DaskClient
from distributed import Future

from runnerd_client.dask import current_run
from runnerd_client.ids import new_key
from runnerd_client.protocol import RunnerdError
from runnerd_client.run import ACTIVE
from runnerd_client.sweep_model import Attempt, CellOutcome, Stop, SweepOptions
from runnerd_client.sweep_record import abandon_running, daemon_connection, settle


class Taken:
    """What a cell's task returns when another attempt holds its cell."""

    def __init__(self, message: str) -> None:
        self.message = message


def cell_task(fn: Callable[..., Any], params: dict[str, Any]) -> Any:
    """A sweep cell on a worker: its run (made by the plugin, claiming the cell) is
    `rd.current_run()` while `fn(**params)` runs."""
    try:
        run = current_run()
    except RunnerdError as exc:
        return Taken(exc.message)
    token = ACTIVE.set(run)
    try:
        return fn(**params)
    finally:
        ACTIVE.reset(token)


class OnDask:
    """Attempts as tasks of a Dask cluster, all submitted at once (Dask schedules them)."""

    slots = sys.maxsize

    def __init__(
        self,
        options: SweepOptions,
        client: DaskClient,
        fn: Callable[..., Any],
        socket_path: str | Path | None = None,
    ) -> None:
        self.options, self.client, self.fn = options, client, fn
        self.socket_path = socket_path
        self.turn = new_key()[-8:]  # keys differ between turns of one sweep (a random end)
        self.pending: dict[Any, tuple[Future[Any], Attempt]] = {}
        self.done: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()

    def start(self, attempt: Attempt) -> None:
        cell, options = attempt.cell, self.options
        spec = {
            "experiment": options.experiment,
            "variation": cell.variation,
            "params": cell.params,
            "sweep_id": options.sweep_id,
            "cell": cell.index,
            "claim_after": attempt.claim_after,
            "retry_of": attempt.retry_of,
            "resume": options.resume,
        }
        with annotate(runnerd=spec):
            future = self.client.submit(
                cell_task,
                self.fn,
                cell.params,
                pure=False,
                retries=0,
                key=f"runnerd-{options.sweep_id}-{cell.index}-{attempt.number}-{self.turn}",
            )
        self.pending[future.key] = (future, attempt)
        future.add_done_callback(self.done.put)  # type: ignore[no-untyped-call]

    def wait(self, timeout: float) -> CellOutcome | None:
        try:
            future = self.done.get(timeout=timeout)
        except queue.Empty:
            return None
        _, attempt = self.pending.pop(future.key)
        outcome = _outcome(future, attempt)
        future.release()  # type: ignore[no-untyped-call]
        return outcome

    def stop(self, why: Stop) -> None:
        """Record the running attempts abandoned (with `why`), then cancel every task."""
        with daemon_connection(self.socket_path) as conn:
            abandon_running(
                conn,
                self.options.sweep_id,
                {attempt.cell.index for _, attempt in self.pending.values()},
                why,
            )
        running = [f for f, _ in self.pending.values() if not f.done()]  # type: ignore[no-untyped-call]
        self.client.cancel(running)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Wait (a while) for the workers to have recorded every attempt ended."""
        with daemon_connection(self.socket_path) as conn:
            settle(conn, self.options.sweep_id)


def _outcome(future: Future[Any], attempt: Attempt) -> CellOutcome:
    cell = attempt.cell
    if future.status == "cancelled":
        return CellOutcome(cell.index, cell.params, "abandoned", error="cancelled")
    if future.status == "error":
        exc = future.exception()  # type: ignore[no-untyped-call]
        name = getattr(exc, "failure_class", type(exc).__name__)
        return CellOutcome(cell.index, cell.params, "failed", error=f"{name}: {exc}", exception=exc)
    value = future.result()
    if isinstance(value, Taken):
        return CellOutcome(cell.index, cell.params, "taken", error=value.message)
    return CellOutcome(cell.index, cell.params, "succeeded", value=value)
