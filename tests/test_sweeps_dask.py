"""Sweeps on a Dask cluster: `rd.sweep(..., executor=client)` and `runnerctl sweep run
--dask`, on a LocalCluster of worker processes reporting to a real daemon."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for

distributed = pytest.importorskip("distributed")

from dask_cluster import (  # noqa: E402  (after the skip: distributed is optional)
    DASK_MARKS,
    Cluster,
    cluster_fixture,  # noqa: F401  (the `cluster` fixture)
)

import runnerd_client as rd  # noqa: E402

pytestmark = DASK_MARKS


def cell(x: int, fail: bool = False) -> int:
    run = rd.current_run()
    assert run is not None and run.params["x"] == x
    if fail:
        raise KeyError(f"shard {x} is missing")
    return x * x


CELLS = [{"x": i, **({"fail": True} if i in (3, 11, 17) else {})} for i in range(20)]


def test_a_sweep_on_the_cluster_under_continue_on_failure(cluster: Cluster) -> None:
    result = rd.sweep(
        "dask-sweep", CELLS, cell, failure_policy="continue_on_failure", executor=cluster.client
    )
    assert [o.index for o in result.outcomes if o.state == "failed"] == [3, 11, 17]
    assert all(o.value == o.index**2 for o in result.outcomes if o.state == "succeeded")
    assert result.summary == {
        "total": 20,
        "succeeded": 17,
        "failed": 3,
        "abandoned": 0,
        "skipped": 0,
        "running": 0,
        "pending": 0,
    }
    assert result.manifest is not None
    manifest = json.loads(result.manifest.read_text())
    assert manifest["cells_summary"] == result.summary
    runs = cluster.daemon.ctl_json("list", "--sweep", result.sweep_id, "--limit", "100")
    assert len(runs) == 20  # one attempt per cell: Dask retried nothing
    by_cell = {r["cell"]: r for r in runs}
    for entry in manifest["cells"]:
        assert entry["run_id"] == by_cell[entry["index"]]["run_id"]
        assert entry["host"] == os.uname().nodename
        if entry["state"] == "failed":
            assert entry["failure"]["failure_class"] == "KeyError"
    assert {o.run_id for o in result.outcomes} == {r["run_id"] for r in runs}


def test_a_sweep_on_the_cluster_under_fail_fast(cluster: Cluster) -> None:
    with pytest.raises(rd.SweepFailed) as raised:
        rd.sweep("dask-fast", CELLS, cell, executor=cluster.client)
    assert isinstance(raised.value.__cause__, KeyError)
    sweep = cluster.daemon.ctl_json("sweep", "list")[0]
    summary = sweep["cells_summary"]
    assert sweep["status"] == "failed"
    assert summary["failed"] >= 1
    assert summary["running"] == summary["pending"] == 0
    assert (
        summary["succeeded"] + summary["failed"] + summary["abandoned"] + summary["skipped"] == 20
    )


def test_runnerctl_sweep_run_on_the_cluster(cluster: Cluster, short_tmp: Path) -> None:
    script = short_tmp / "cell.py"
    script.write_text(
        "import sys\nx = int(sys.argv[1])\n"
        "if x == 2:\n    raise ValueError(f'x={x} diverged')\nprint(x * 10)\n"
    )
    result = cluster.daemon.ctl(
        "sweep",
        "run",
        "--experiment",
        "dask-cli",
        "--grid",
        "x=0,1,2,3",
        "--failure-policy",
        "continue_on_failure",
        "--dask",
        cluster.cluster.scheduler_address,
        "--",
        sys.executable,
        str(script),
        "{x}",
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "3 succeeded, 1 failed of 4" in result.stdout
    sweep = cluster.daemon.ctl_json(
        "sweep", "show", cluster.daemon.ctl_json("sweep", "list")[0]["sweep_id"]
    )
    failed = [c for c in sweep["cells"] if c["state"] == "failed"]
    assert [c["index"] for c in failed] == [2]
    assert failed[0]["failure"]["failure_class"] == "ValueError"
    assert failed[0]["failure"]["exit_code"] == 1
    assert "ValueError: x=2 diverged" in failed[0]["failure"]["traceback"]
    workers = set(cluster.worker_pids())
    for cell in sweep["cells"]:
        run = cluster.daemon.ctl_json("show", cell["run_id"])
        assert run["tags"]["worker"] in workers
        if cell["state"] == "succeeded":
            out = Path(run["run_dir"], "stdout.log").read_text()
            assert out.strip() == str(cell["params"]["x"] * 10)


def steady(x: int, release: str) -> int:
    """Cell 5 runs until `release` appears (its worker is killed meanwhile); the rest briefly."""
    while x == 5 and not os.path.exists(release):
        time.sleep(0.05)
    time.sleep(0.4)
    return x


def test_a_worker_lost_mid_sweep_leaves_each_cell_one_success(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The worker running cell 5 is killed while it runs (it waits until then): its run ends
    failed_crash, Dask runs it again elsewhere, and no cell that succeeded runs again."""
    release = tmp_path / "release"
    outcome: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            result=rd.sweep(
                "dask-lost",
                [{"x": i, "release": str(release)} for i in range(12)],
                steady,
                failure_policy="continue_on_failure",
                executor=cluster.client,
            )
        )
    )
    thread.start()
    held = wait_for(
        lambda: next(
            (
                r
                for r in cluster.daemon.ctl_json(
                    "list", "--experiment", "dask-lost", "--state", "running"
                )
                if r["cell"] == 5
            ),
            None,
        ),
        timeout=60,
        what="cell 5 to run",
    )
    os.kill(cluster.worker_pids()[held["tags"]["worker"]], signal.SIGKILL)
    wait_for(
        lambda: cluster.daemon.ctl_json("show", held["run_id"])["state"] == "failed_crash",
        what="the killed cell's run to end",
    )
    release.touch()
    thread.join(120)
    result = outcome["result"]
    assert result.summary["succeeded"] == 12
    runs = cluster.daemon.ctl_json("list", "--sweep", result.sweep_id, "--limit", "100")
    succeeded = sorted(r["cell"] for r in runs if r["state"] == "succeeded")
    assert succeeded == list(range(12))  # one success per cell: nothing recomputed
    crashed = [r for r in runs if r["state"] == "failed_crash"]
    assert [r["run_id"] for r in crashed] == [held["run_id"]]
    assert crashed[0]["failure"]["failure_class"] == "ProcessExited"


def held_or_failing(i: int, state: str) -> int:
    """Cell 0 runs until `release` appears; cell 1 fails once cell 0 runs."""
    folder = Path(state)
    (folder / f"start-{i}").touch()
    deadline = time.monotonic() + 30
    while i == 0 and not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    while i == 1 and not (folder / "start-0").exists():
        time.sleep(0.01)
    if i == 1:
        raise ValueError("cell 1 diverged")
    return i


def fail_fast_cause(daemon: Daemon, run_id: str) -> list[str]:
    run = daemon.ctl_json("show", run_id)
    return [t["cause"] for t in run["transitions"] if t["to"] == "failed_abandoned"]


def test_fail_fast_on_the_cluster_stops_the_running_cells(
    cluster: Cluster, short_tmp: Path
) -> None:
    cells = [{"i": i, "state": str(short_tmp)} for i in range(3)]
    try:
        with pytest.raises(rd.SweepFailed) as raised:
            rd.sweep("dask-stops", cells, held_or_failing, executor=cluster.client)
    finally:
        (short_tmp / "release").touch()  # the worker's thread runs on: let it end
    assert raised.value.cell.index == 1
    assert isinstance(raised.value.__cause__, ValueError)
    shown = cluster.daemon.ctl_json("sweep", "show", raised.value.sweep_id)
    assert [c["state"] for c in shown["cells"]] == ["abandoned", "failed", "skipped"]
    assert shown["cells"][0]["failure"]["failure_class"] == "FailFast"
    assert fail_fast_cause(cluster.daemon, shown["cells"][0]["run_id"]) == ["fail_fast"]
    outcomes = {o.index: o.state for o in raised.value.result.outcomes}
    assert outcomes == {0: "abandoned", 1: "failed", 2: "skipped"}


HELD = """
import sys, time
from pathlib import Path
state, x = Path(sys.argv[1]), sys.argv[2]
(state / f"start-{x}").touch()
deadline = time.monotonic() + 30
while x == "0" and time.monotonic() < deadline:
    time.sleep(0.01)
while x == "1" and not (state / "start-0").exists():
    time.sleep(0.01)
if x == "1":
    raise ValueError("cell 1 diverged")
(state / f"end-{x}").touch()
"""


def test_fail_fast_of_runnerctl_on_the_cluster_kills_the_running_commands(
    cluster: Cluster, short_tmp: Path
) -> None:
    script = short_tmp / "held.py"
    script.write_text(HELD)
    result = cluster.daemon.ctl(
        "sweep",
        "run",
        "--experiment",
        "dask-cli-stops",
        "--grid",
        "x=0,1,2",
        "--dask",
        cluster.cluster.scheduler_address,
        "--",
        sys.executable,
        str(script),
        str(short_tmp),
        "{x}",
        check=False,
    )

    assert result.returncode == 1, result.stderr
    assert "fail_fast: ValueError: cell 1 diverged" in result.stderr
    sweep_id = cluster.daemon.ctl_json("sweep", "list")[0]["sweep_id"]
    cells = cluster.daemon.ctl_json("sweep", "show", sweep_id)["cells"]
    assert [c["state"] for c in cells] == ["abandoned", "failed", "skipped"]
    assert fail_fast_cause(cluster.daemon, cells[0]["run_id"]) == ["fail_fast"]
    wait_for(
        lambda: not running(script),
        timeout=10,
        what="cell 0's command to be killed with its cancelled task",
    )
    assert not (short_tmp / "end-0").exists()


def running(script: Path) -> bool:
    """Whether a process runs `script` now."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(script).encode() in cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False
