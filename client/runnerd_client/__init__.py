"""runnerd_client: report experiment runs to the runnerd daemon (stdlib + msgpack only).

import runnerd_client as rd

with rd.run("lr-sweep", variation="lr=0.1", params={"lr": 0.1}) as run:
    ...
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from runnerd_client.client import Client
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.errors import RunRefused
from runnerd_client.exits import Terminated
from runnerd_client.fields import check_callable
from runnerd_client.protocol import RunnerdError, State
from runnerd_client.retries import Retries, backoff_delay, worth_retrying
from runnerd_client.run import ACTIVE, RUN_ID_ENV, Run
from runnerd_client.shared import connect
from runnerd_client.sweep import CellOutcome, SweepFailed, SweepResult, resume_sweep, sweep

__all__ = [
    "CellOutcome",
    "Client",
    "Connection",
    "DaemonUnavailable",
    "Run",
    "RunRefused",
    "RunnerdError",
    "State",
    "SweepFailed",
    "SweepResult",
    "Terminated",
    "connect",
    "current_run",
    "resume_sweep",
    "retrying",
    "run",
    "sweep",
]
__version__ = "0.1.0"
T = TypeVar("T")


def run(
    experiment: str,
    variation: str = "default",
    *,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    heartbeat_interval: float = 60.0,
    heartbeat_timeout: float | None = None,
    lost_grace: float | None = None,
    deadline: float | None = None,
    resume: bool = False,
    stall_timeout: float | None = None,
) -> Run:
    """A new run of `experiment`; use it with `with`: it starts, beats and ends truthfully.

    `stall_timeout`: seconds with no progress at all (CPU, output, files, heartbeats sent
    by hand) before the daemon marks it lost as stalled; 0 never, None the daemon's.

    With `resume=True`, after an unsuccessful attempt of the same experiment and variation
    the run continues it: `run.resume_checkpoint` is that attempt's last checkpoint (its
    `data` and `path`), or None. Changed params raise RunRefused (`conflict`).

    A wrong argument raises TypeError or ValueError naming it, before anything is sent; a
    run the daemon refuses to create or start raises RunRefused (a RunnerdError), so that
    the experiment never runs untracked believing it is tracked. A daemon that cannot be
    reached raises nothing: the events are spooled and replayed.
    """
    return connect().run(
        experiment,
        variation,
        params=params,
        tags=tags,
        run_dir=run_dir,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        lost_grace=lost_grace,
        deadline=deadline,
        resume=resume,
        stall_timeout=stall_timeout,
    )


def retrying(
    fn: Callable[..., T],
    *args: Any,
    experiment: str,
    variation: str = "default",
    retries: int = 3,
    backoff: float = 2.0,
    retry_on: str = "retryable",
    params: dict[str, Any] | None = None,
    **kwargs: Any,
) -> T:
    """Call `fn(*args, **kwargs)` as tracked attempts of one (experiment, variation).

    A failed attempt is retried after `backoff ** attempt` seconds (with jitter) while
    retries remain, and, under retry_on="retryable", only if the daemon's diagnosis says
    a rerun may help (network, timeout, interruption: yes; a bug or a bad input: no).
    Returns the result of the attempt that succeeds, or raises the last error. A wrong
    argument (retries < 0, retry_on not "retryable" or "any") raises at once.
    """
    policy = Retries(retries, backoff, retry_on)
    check_callable("fn", fn)
    client, retry_of, attempt = connect(), None, 0
    while True:
        attempt += 1
        run = client.run(experiment, variation, params=params, retry_of=retry_of)
        try:
            with run:
                return fn(*args, **kwargs)
        except Exception:
            if attempt > policy.retries or not worth_retrying(run.diagnosis, policy.retry_on):
                raise
        time.sleep(backoff_delay(policy.backoff, attempt))
        retry_of = run.run_id


def current_run() -> Run | None:
    """The sweep cell's run this code executes in, else the run named by $RUNNERD_RUN_ID
    (set by `runnerctl exec`), attached; else None."""
    active = ACTIVE.get()
    if active is not None:
        return active
    run_id = os.environ.get(RUN_ID_ENV)
    return connect().attach(run_id) if run_id else None
