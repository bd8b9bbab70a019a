"""The Hydra launcher plugin: `hydra/launcher=runnerd` runs a multirun as a runnerd sweep.

    python my_app.py --multirun x=1,2,3 lr=0.1,0.01 hydra/launcher=runnerd \
        hydra.launcher.failure_policy=continue_on_failure
    python my_app.py --multirun x=1,2,3 lr=0.1,0.01 hydra/launcher=runnerd \
        hydra.launcher.resume=SWEEP_ID      # only the jobs that did not succeed

Each job is a cell whose params are its overrides; it runs in the sweep's run through
Hydra's own `run_job` (callbacks, output folder, logging), so its record holds the job's
real exception. The sweep's folder (manifest.json) is Hydra's sweep folder, and a resume
writes its jobs there under their original job numbers.
"""

# No `from __future__ import annotations`: Hydra loads this module without registering
# it in sys.modules, and the config dataclass needs its annotations as types.
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

import runnerd_client as rd
from runnerd_client.cells import cell_key
from runnerd_client.hydra import connect_daemon, job_returns, overrides_params
from runnerd_client.protocol import SweepGet
from runnerd_client.sweep import sweep_cells

log = logging.getLogger(__name__)


@dataclass
class RunnerdLauncherConf:
    _target_: str = "hydra_plugins.runnerd_launcher.runnerd_launcher.RunnerdLauncher"
    experiment: str | None = None
    failure_policy: str = "fail_fast"
    jobs: int = 1
    resume: str | None = None


ConfigStore.instance().store(
    group="hydra/launcher", name="runnerd", node=RunnerdLauncherConf, provider="runnerd"
)


class RunnerdLauncher(Launcher):
    """Launches a multirun's jobs as the cells of a runnerd sweep."""

    def __init__(
        self,
        experiment: str | None = None,
        failure_policy: str = "fail_fast",
        jobs: int = 1,
        resume: str | None = None,
    ) -> None:
        self.experiment, self.failure_policy = experiment, failure_policy
        self.jobs, self.resume = jobs, resume
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        cells = [overrides_params(job) for job in job_overrides]
        folder = self._sweep_dir(cells)
        Path(folder).mkdir(parents=True, exist_ok=True)
        by_key = {cell_key(params): index for index, params in enumerate(cells)}
        done: dict[int, JobReturn] = {}

        def hydra_job(**params: Any) -> Any:
            index = by_key[cell_key(params)]  # a resume's stored params may be in another order
            ret = self._run_job(initial_job_idx + index, job_overrides[index], folder)
            done[index] = ret
            return ret.return_value  # raises the job's exception: the cell's run records it

        log.info("Launching %d jobs as a runnerd sweep", len(job_overrides))
        if self.resume:
            result = rd.resume_sweep(
                self.resume, hydra_job, jobs=self.jobs, failure_policy=self.failure_policy
            )
        else:
            result = rd.sweep(
                self._experiment(),
                cells,
                hydra_job,
                failure_policy=self.failure_policy,
                jobs=self.jobs,
                folder=folder,
            )
        log.info(
            "runnerd sweep %s: %s (manifest %s)", result.sweep_id, result.summary, result.manifest
        )
        outcomes = {o.index: o for o in result.outcomes}  # the cells are the jobs, in order
        return job_returns(job_overrides, outcomes, done, self._succeeded(result.sweep_id))

    def _succeeded(self, sweep_id: str) -> set[int]:
        """The sweep's cells whose latest attempt succeeded (a resume ran only the others)."""
        if not self.resume:
            return set()
        conn = connect_daemon()
        try:
            return {c["index"] for c in sweep_cells(conn, sweep_id) if c["state"] == "succeeded"}
        finally:
            conn.close()

    def _run_job(self, number: int, overrides: Sequence[str], folder: str) -> JobReturn:
        """One job as Hydra's basic launcher runs it, in `folder` under its job number."""
        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        log.info("\t#%d : %s", number, " ".join(filter_overrides(overrides)))
        sweep_config = self.hydra_context.config_loader.load_sweep_config(
            self.config, list(overrides)
        )
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = number
            sweep_config.hydra.job.num = number
            sweep_config.hydra.sweep.dir = folder
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _experiment(self) -> str:
        assert self.config is not None
        return self.experiment or str(OmegaConf.select(self.config, "hydra.job.name"))

    def _sweep_dir(self, cells: list[dict[str, Any]]) -> str:
        """Hydra's sweep folder; a resume's is the original sweep's (its stored folder),
        and its jobs must be the stored ones."""
        assert self.config is not None
        if not self.resume:
            return str(Path(str(self.config.hydra.sweep.dir)).resolve())
        conn = connect_daemon()
        try:
            stored = conn.call(SweepGet(sweep=self.resume))["sweep"]
        finally:
            conn.close()
        if stored["spec"].get("cells") != cells:
            raise ValueError(
                f"hydra.launcher.resume={self.resume}: these jobs are not that"
                f" sweep's ({len(stored['spec'].get('cells') or [])} stored,"
                f" {len(cells)} given); run the same overrides again"
            )
        return str(stored["folder"])
