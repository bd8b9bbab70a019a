"""What `rd.connect()` returns: the client that makes runs and attaches to them.

A run is created (or a sweep's cell claimed) before it starts, and an attach joins a run
another process made; either one the daemon refuses raises RunRefused, so that the
experiment never runs untracked believing it is tracked.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runnerd_client import paths
from runnerd_client.fields import Positive, check_argument, check_fields
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import Attach, Create, Start
from runnerd_client.reporter import Reporter
from runnerd_client.run import Run


@dataclass(frozen=True)
class Cell:
    """A sweep's cell an attempt claims: it runs only if the cell's latest attempt is still
    `claim_after` (None: it has none yet) and no attempt of it is live."""

    sweep_id: str
    index: int
    claim_after: str | None = None
    replication: str | None = None
    """Set: the attempt replicates the cell instead (`sweep replicate`): it is linked to the
    cell and tagged with this replication's id, and claims nothing."""


class Client(Reporter):
    """What `rd.connect()` returns: makes runs and attaches to them."""

    def run(
        self,
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
        retry_of: str | None = None,
        launch: dict[str, Any] | None = None,
        resume: bool = False,
        cell: Cell | None = None,
        stall_timeout: float | None = None,
        launch_env: dict[str, str] | None = None,
    ) -> Run:
        """Register a new run (pending); `start()` it or use it as a context manager.

        `stall_timeout`: seconds without progress (CPU, output, files, heartbeats) before
        the daemon calls it stalled (0: never; None: the daemon's). `retry_of` links it to
        the attempt it reruns; `launch` is how to launch it again, and `launch_env` the
        environment its command runs with (kept apart: shown only when asked for).
        With `resume`, after an unsuccessful attempt of the same experiment and variation
        the run continues it: `run.resumed_from` names it and `run.resume_checkpoint` holds
        its last checkpoint. `cell` claims a sweep's cell for this attempt.

        A wrong argument raises TypeError or ValueError naming it, before anything is sent.
        A create the daemon refuses (a resume whose params changed, a claim another attempt
        holds: `conflict`) raises RunRefused.
        """
        run_id = new_run_id()
        limits = {
            "heartbeat_timeout": heartbeat_timeout,
            "lost_grace": lost_grace,
            "deadline": deadline,
            "stall_timeout": stall_timeout,
        }
        check_argument("heartbeat_interval", Positive, heartbeat_interval)
        check_fields(Start(key="-", run_id=run_id, **limits))  # refused later, left pending
        folder = Path(run_dir).resolve() if run_dir else paths.default_run_dir(run_id)
        params = {} if params is None else params
        run = Run(
            self,
            run_id,
            experiment,
            variation,
            params=params,
            run_dir=folder,
            heartbeat_interval=heartbeat_interval,
            limits=limits,
        )
        claim: dict[str, Any] = (
            {"sweep_id": cell.sweep_id, "cell": cell.index, "claim_after": cell.claim_after}
            if cell
            else {}
        )
        if cell and cell.replication:
            claim["replicates"] = True
            tags = {**(tags or {}), "replication": cell.replication}
        reply = (
            run.answer(
                self.emit(
                    Create(
                        key=new_key(),
                        run_id=run_id,
                        experiment=experiment,
                        variation=variation,
                        params=params,
                        tags={} if tags is None else tags,
                        cwd=os.getcwd(),
                        run_dir=str(folder),
                        host=socket.gethostname(),
                        retry_of=retry_of,
                        launch=launch,
                        launch_env=launch_env,
                        resume=resume,
                        at=time.time(),
                        **claim,
                    )
                ),
                "create",
                tracks=True,
            )
            or {}
        )
        run.attempt = reply.get("attempt")
        run.resumed_from = reply.get("resumed_from")
        run.resume_checkpoint = reply.get("resume_checkpoint")
        return run

    def attach(self, run_id: str) -> Run:
        """Join an existing run (one launched by `runnerctl exec`, say) from this process.

        With the daemon away the attach is spooled and the run's names are not known yet.
        A run the daemon does not know raises RunRefused; one already ended is said so once.
        """
        run = Run(
            self,
            run_id,
            "",
            "",
            params={},
            run_dir=paths.default_run_dir(run_id),
            heartbeat_interval=60.0,
            limits={},
            attached=True,
        )
        reply = (
            run.answer(
                self.emit(Attach(key=new_key(), run_id=run_id, at=time.time())),
                "attach to",
                tracks=True,
            )
            or {}
        )
        info = reply.get("run")
        if info:
            run.experiment, run.variation = info["experiment"], info["variation"]
            run.params, run.run_dir = info["params"], Path(info["run_dir"])
            run.attempt = info.get("attempt")
            run.resumed_from = info.get("resumed_from")
        run.resume_checkpoint = reply.get("resume_checkpoint")
        return run
