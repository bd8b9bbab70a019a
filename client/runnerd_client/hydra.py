"""Hydra jobs as runnerd runs (extra `runnerd[hydra]`).

Two ways in, both configured, never coded:

- `RunnerdCallback`, a Hydra callback (`hydra.callbacks.runnerd._target_:
  runnerd_client.hydra.RunnerdCallback`): each job is a run of experiment `hydra.job.name`
  whose params are the job's overrides, ended with the job's real exception; SIGTERM ends
  it `failed_abandoned`. A `--multirun` of Hydra's basic sweeper is a runnerd sweep: the
  jobs never started (after a SIGTERM) are recorded `skipped`.
- `hydra/launcher=runnerd` (the plugin in `hydra_plugins.runnerd_launcher`): the multirun
  runs as a runnerd sweep (`rd.sweep`), with `hydra.launcher.failure_policy`
  (`fail_fast`, the default, or `continue_on_failure`), `jobs`, a manifest.json in Hydra's
  sweep folder, and `hydra.launcher.resume=SWEEP_ID`, which reruns only the jobs that did
  not succeed, in the original folders under their original job numbers.

Cells and runs are named by their overrides in the order written (`x=3,lr=0.1`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runnerd_client import paths
from runnerd_client.cells import variation
from runnerd_client.client import Cell
from runnerd_client.connection import Connection
from runnerd_client.exits import Terminated, catch_sigterm
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import SweepCreate, SweepEnd, SweepPolicy, SweepStatus
from runnerd_client.run import ACTIVE, Run

log = logging.getLogger("runnerd_client.hydra")
SWEEP_ENV = "RUNNERD_HYDRA_SWEEP"
"""The sweep a multirun's jobs claim their cells in (inherited by a launcher's processes)."""


def overrides_params(overrides: Iterable[str]) -> dict[str, Any]:
    """A job's overrides as params: `x=3` gives {"x": 3}, typed as Hydra types them."""
    params: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        value = override.value()
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = override.get_value_element_as_str()
        params[override.get_key_element().lstrip("+~")] = value
    return params


def basic_sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of a multirun, in its order (job numbers)."""
    sweeper = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in sweeper.items()]
    arguments += list(OmegaConf.select(config, "hydra.overrides.task") or [])
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    jobs: list[list[str]] = [[]]
    for values in choices.values():
        jobs = [job + [value] for job in jobs for value in values]
    return jobs


def connect_daemon() -> Connection:
    return Connection(paths.socket_path())


class RunnerdCallback(Callback):
    """Records each Hydra job as a runnerd run (see the module)."""

    def __init__(self, experiment: str | None = None) -> None:
        self.experiment = experiment
        self.sweep_id: str | None = None
        self.run: Run | None = None
        self.terminated = False
        self._exit_hook = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
        if launcher.endswith("RunnerdLauncher") or not sweeper.endswith("BasicSweeper"):
            return  # the launcher records the sweep; another sweeper plans its own jobs
        try:
            cells = [overrides_params(job) for job in basic_sweep_jobs(config)]
            sweep_id = new_run_id()
            conn = connect_daemon()
            try:
                conn.call(
                    SweepCreate(
                        key=new_key(),
                        sweep_id=sweep_id,
                        experiment=self._experiment(config),
                        spec={"kind": "hydra", "cells": cells},
                        failure_policy=SweepPolicy.CONTINUE_ON_FAILURE,
                    )
                )
            finally:
                conn.close()
        except Exception as exc:  # the multirun goes on, its jobs recorded one by one
            log.warning("runnerd: the multirun is not recorded as a sweep: %s", exc)
            return
        self.sweep_id = os.environ[SWEEP_ENV] = sweep_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end_sweep(SweepStatus.SUCCEEDED)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if ACTIVE.get() is not None:
            return  # a runnerd sweep's cell runs this job: that cell's run is its record
        try:
            run = self._job_run(config)
        except Exception as exc:  # the job runs all the same, unrecorded
            log.warning("runnerd: job not recorded: %s", exc)
            return
        self._catch_exit()
        run.__enter__()
        self.run = run

    def _job_run(self, config: DictConfig) -> Run:
        """The job's run, claiming its cell of the multirun's sweep if there is one."""
        from runnerd_client import connect

        overrides = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        params = overrides_params(overrides)
        sweep_id = self.sweep_id or os.environ.get(SWEEP_ENV)
        number = OmegaConf.select(config, "hydra.job.num")
        cell = Cell(sweep_id, int(number)) if sweep_id and number is not None else None
        return connect().run(
            self._experiment(config),
            variation(params),
            params=params,
            tags={
                "hydra.overrides": overrides,
                "hydra.job_num": number,
                "hydra.output_dir": OmegaConf.select(config, "hydra.runtime.output_dir"),
            },
            cell=cell,
        )

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        if job_return.status == JobStatus.COMPLETED:
            run.__exit__(None, None, None)
            return
        error = job_return._return_value  # the job's exception (return_value re-raises it)
        if not isinstance(error, BaseException):
            error = RuntimeError(f"the job failed: {error!r}")
        run.__exit__(type(error), error, error.__traceback__)

    def _experiment(self, config: DictConfig) -> str:
        return self.experiment or str(OmegaConf.select(config, "hydra.job.name") or "hydra")

    def _catch_exit(self) -> None:
        """SIGTERM raises Terminated, which Hydra does not catch: the exit hook records the
        job abandoned and the jobs never started skipped."""
        if not self._exit_hook:
            atexit.register(self._at_exit)
            self._exit_hook = True
        catch_sigterm(self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.terminated = True
        raise Terminated()

    def _at_exit(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            error: BaseException = (
                Terminated() if self.terminated else SystemExit("the process exited during the job")
            )
            run.__exit__(type(error), error, None)
        self._end_sweep(SweepStatus.INTERRUPTED)

    def _end_sweep(self, status: str) -> None:
        """End the sweep: its manifest is written; jobs never started are skipped."""
        sweep_id, self.sweep_id = self.sweep_id, None
        if sweep_id is None:
            return
        conn = connect_daemon()
        try:
            conn.call(SweepEnd(key=new_key(), sweep_id=sweep_id, status=status, skip=True))
        except Exception as exc:
            log.warning("runnerd: sweep %s not ended: %s", sweep_id, exc)
        finally:
            conn.close()


def job_returns(
    overrides: Sequence[Sequence[str]],
    outcomes: dict[int, Any],
    done: dict[int, JobReturn],
    succeeded_before: set[int],
) -> list[JobReturn]:
    """What Hydra's sweeper expects of a launch, from a sweep's outcomes by job index: the
    job's own JobReturn where this process ran it, else one made of its outcome; a job a
    resume did not run because it had succeeded counts as completed."""
    returns = []
    for index, job in enumerate(overrides):
        if index in done:
            returns.append(done[index])
            continue
        outcome = outcomes.get(index)
        ret = JobReturn(overrides=list(job))
        if outcome is None and index in succeeded_before:
            ret.status = JobStatus.COMPLETED
        elif outcome is not None and outcome.state == "succeeded":
            ret.status, ret.return_value = JobStatus.COMPLETED, outcome.value
        else:
            ret.status = JobStatus.FAILED
            state = outcome.state if outcome is not None else "not run"
            error = outcome.exception if outcome is not None else None
            ret._return_value = error or RuntimeError(
                f"job {' '.join(job)}: {state}"
                + (f": {outcome.error}" if outcome is not None and outcome.error else "")
            )
        returns.append(ret)
    return returns
