"""Dask's KilledWorker on a real cluster: whether a rerun helps is decided from what killed
the task's workers, and the finding says which (issue 19)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from conftest import Daemon, wait_for

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

from dask_cluster import Cluster, report_to, start_worker  # noqa: E402  (after the skip: distributed is optional)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:Port .* is already in use"),  # another cluster's
    pytest.mark.timeout(180),
]


def grow(limit_mb: int) -> None:
    chunks = []
    for _ in range(limit_mb * 2 // 20):
        chunks.append(bytearray(20 << 20))
        time.sleep(0.05)


def sleep_long(seconds: float) -> None:
    time.sleep(seconds)


def finding(daemon: Daemon, run_id: str) -> dict[str, Any]:
    [found] = daemon.ctl_json("diagnose", run_id)["findings"]
    return dict(found)


def gave_up(made: Cluster, key: str) -> dict[str, Any]:
    """The task's run once its death is labelled (the labels' notes are in the message)."""
    return wait_for(
        lambda: (
            (r := made.run_of(key))
            and r["state"].startswith("failed")
            and (r["failure"] or {}).get("category") in ("killed_worker", "oom", "walltime")
            and r
        ),
        timeout=30,
        what="the run ended and labelled",
    )


def test_killed_worker_after_the_workers_ran_out_of_memory_is_not_retryable(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    report_to(daemon, monkeypatch)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        made = Cluster(daemon, n_workers=1, memory_limit="400MiB")
    try:
        future = made.client.submit(grow, 400, retries=0)
        with pytest.raises(distributed.KilledWorker):
            future.result(timeout=90)
        run = gave_up(made, future.key)
        assert run["failure"]["retryable"] is False
        found = finding(daemon, run["run_id"])
        assert found["retryable"] is False
        assert "memory" in found["pattern"]
    finally:
        made.close()


def test_killed_worker_after_a_walltime_is_retryable(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    report_to(daemon, monkeypatch)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        made = Cluster(daemon, n_workers=0)
    worker = start_worker(made.cluster.scheduler_address, dict(os.environ))
    try:
        made.client.wait_for_workers(1, timeout=60)
        future = made.client.submit(sleep_long, 60)
        wait_for(lambda: made.run_of(future.key, "running"), timeout=30, what="the task")
        wait_for(lambda: made.in_ledger(future.key), what="the scheduler's ledger entry")
        os.killpg(worker.pid, signal.SIGTERM)  # as a job's walltime does
        worker.wait(60)
        with pytest.raises(distributed.KilledWorker):
            future.result(timeout=60)
        run = gave_up(made, future.key)
        assert run["failure"]["retryable"] is True
        found = finding(daemon, run["run_id"])
        assert found["retryable"] is True
        assert "walltime" in found["pattern"]
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        made.close()
