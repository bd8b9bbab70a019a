"""A LocalCluster whose workers report to a test's daemon (and a `cluster` fixture of one),
worker processes of their own, and the marks of a module of Dask tests, for the Dask tests
(imported after `pytest.importorskip("distributed")`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import pytest

from conftest import Daemon
from runnerd_client.dask import RunnerdSchedulerPlugin, RunnerdWorkerPlugin

DASK_MARKS = [  # a Dask test module's `pytestmark`: Dask's own warnings are not ours to fail on
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.timeout(180),
]


class Cluster:
    """A LocalCluster whose workers report to `daemon`, and a client to it."""

    def __init__(self, daemon: Daemon, **options: Any) -> None:
        self.daemon = daemon
        self.cluster = distributed.LocalCluster(
            n_workers=options.pop("n_workers", 2),
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            **options,
        )
        self.client = distributed.Client(self.cluster)
        self.client.register_plugin(RunnerdWorkerPlugin(experiment="dask-test"))
        self.scheduler_plugin = RunnerdSchedulerPlugin()
        self.client.register_plugin(self.scheduler_plugin)

    def runs(self) -> list[dict[str, Any]]:
        return list(self.daemon.ctl_json("list", "--experiment", "dask-test", "--limit", "1000"))

    def run_of(self, key: str, state: str | None = None) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in self.runs()
                if r["tags"].get("dask_key") == key and (state is None or r["state"] == state)
            ),
            None,
        )

    def in_ledger(self, key: str) -> bool:
        """Whether the scheduler plugin has entered the task's run (after LEDGER_DELAY)."""

        def look(dask_scheduler: Any) -> bool:
            return key in dask_scheduler.plugins[RunnerdSchedulerPlugin.name].ledger

        return bool(self.client.run_on_scheduler(look))

    def worker_pids(self) -> dict[str, int]:
        return dict(self.client.run(os.getpid))

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


@pytest.fixture(name="cluster")
def cluster_fixture(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A cluster of two workers reporting to the test's daemon, closed after the test. A test
    module takes it by importing `cluster_fixture`; tests ask for `cluster`."""
    report_to(daemon, monkeypatch)
    made = Cluster(daemon)
    try:
        yield made
    finally:
        made.close()


def report_to(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process's environment at `daemon`: the workers it starts inherit it."""
    for name in ("RUNNERD_SOCKET", "RUNNERD_DB", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(name, daemon.env[name])


def start_worker(address: str, env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    """A one-thread worker process of its own session (to be killed as a group), with the
    tests folder on its path to find our tasks."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            address,
            "--nthreads",
            "1",
            "--nworkers",
            "1",
            "--no-dashboard",
            *extra,
        ],
        start_new_session=True,
        stderr=subprocess.DEVNULL,
        env={**env, "PYTHONPATH": str(Path(__file__).parent)},
    )  # to find our tasks
