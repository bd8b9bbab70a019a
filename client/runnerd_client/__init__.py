"""runnerd_client: report experiment runs to the runnerd daemon (stdlib + msgpack only).

    import runnerd_client as rd

    with rd.run("lr-sweep", variation="lr=0.1", params={"lr": 0.1}) as run:
        ...
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.protocol import RunnerdError, State
from runnerd_client.run import RUN_ID_ENV, Client, Run, Terminated

__all__ = [
    "Client", "Connection", "DaemonUnavailable", "Run", "RunnerdError", "State", "Terminated",
    "connect", "current_run", "run",
]
__version__ = "0.1.0"

_shared: tuple[int, Client] | None = None
_shared_lock = threading.Lock()


def connect(socket_path: str | Path | None = None) -> Client:
    """The process's client: one connection shared by all its threads (new after a fork)."""
    global _shared
    with _shared_lock:
        if socket_path is not None:
            return Client(socket_path)
        if _shared is None or _shared[0] != os.getpid():
            _shared = (os.getpid(), Client())
        return _shared[1]


def run(experiment: str, variation: str = "default", *, params: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None, run_dir: str | Path | None = None,
        heartbeat_interval: float = 60.0, heartbeat_timeout: float | None = None,
        lost_grace: float | None = None, deadline: float | None = None) -> Run:
    """A new run of `experiment`; use it with `with`: it starts, beats and ends truthfully."""
    return connect().run(
        experiment, variation, params=params, tags=tags, run_dir=run_dir,
        heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
        lost_grace=lost_grace, deadline=deadline,
    )


def current_run() -> Run | None:
    """The run named by $RUNNERD_RUN_ID (set by `runnerctl exec`), attached; else None."""
    run_id = os.environ.get(RUN_ID_ENV)
    return connect().attach(run_id) if run_id else None
