"""runnerd on Dask: a LocalCluster of separate worker processes on this machine, a real
daemon, real SIGKILLs. Each task dispatch must be one run in the daemon, ended truly.
(Sweeps on a cluster: test_sweeps_dask.py.)"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

from dask_cluster import (  # noqa: E402  (after the skip: distributed is optional)
    DASK_MARKS,
    Cluster,
    cluster_fixture,  # noqa: F401  (the `cluster` fixture)
    report_to,
    start_worker,
)

from runnerd_client.dask import (  # noqa: E402
    RunnerdWorkerPlugin,
    current_run,
)

pytestmark = DASK_MARKS


def add_one(x: int) -> tuple[int, str | None]:
    run = current_run()
    if run is not None:
        out = run.run_dir / "out.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(str(x + 1))
        run.artifact(out).flush()
    return x + 1, run.run_id if run else None


def explode(x: int) -> None:
    raise ValueError(f"no data for shard {x}")


def sleep_long(seconds: float) -> None:
    time.sleep(seconds)


def test_tasks_that_succeed_and_raise_end_their_runs_truly(cluster: Cluster) -> None:
    cluster.client.register_plugin(RunnerdWorkerPlugin(experiment="dask-test"))  # again
    good = cluster.client.submit(add_one, 41)
    value, run_id = good.result()
    assert value == 42 and run_id is not None
    bad = cluster.client.submit(explode, 7)
    with pytest.raises(ValueError):
        bad.result()
    ok = wait_for(lambda: cluster.run_of(good.key, "succeeded"), what="the succeeded run")
    failed = wait_for(lambda: cluster.run_of(bad.key, "failed_crash"), what="the failed run")
    assert ok["run_id"] == run_id
    assert ok["tags"]["worker"] in cluster.worker_pids()
    assert ok["tags"]["host"] == ok["host"] == os.uname().nodename
    shown = cluster.daemon.ctl_json("show", run_id)
    assert [Path(a["path"]).name for a in shown["artifacts"]] == ["out.txt"]
    failure = failed["failure"]
    assert failure["failure_class"] == "ValueError"
    assert failure["message"] == "no data for shard 7"
    assert "in explode" in failure["traceback"]
    assert failure["traceback"].rstrip().endswith("ValueError: no data for shard 7")
    # Registered twice, the plugin still makes one run per dispatch.
    assert len([r for r in cluster.runs() if r["tags"]["dask_key"] == good.key]) == 1


def test_a_killed_worker_fails_its_run_and_dask_retries_on_another(cluster: Cluster) -> None:
    future = cluster.client.submit(sleep_long, 60)
    first = wait_for(lambda: cluster.run_of(future.key, "running"), what="the task to run")
    victim = first["tags"]["worker"]
    os.kill(cluster.worker_pids()[victim], signal.SIGKILL)
    killed = wait_for(
        lambda: cluster.run_of(future.key, "failed_crash"),
        timeout=5,
        what="the killed worker's run to be failed_crash",
    )
    assert killed["run_id"] == first["run_id"]
    assert killed["failure"]["failure_class"] == "ProcessExited"
    again = wait_for(
        lambda: next(
            (
                r
                for r in cluster.runs()
                if r["tags"]["dask_key"] == future.key and r["state"] == "running"
            ),
            None,
        ),
        timeout=30,
        what="Dask's second dispatch on another worker",
    )
    assert again["tags"]["worker"] != victim
    assert again["attempt"] == killed["attempt"] + 1
    future.cancel()
    # The nanny restarts the killed worker, and the new one gets the plugin too.
    restarted = wait_for(
        lambda: set(cluster.worker_pids()) - {victim, again["tags"]["worker"]},
        timeout=30,
        what="the nanny to restart the worker",
    )
    probe = cluster.client.submit(quick, 7, workers=list(restarted))
    assert probe.result() == 14
    recorded = wait_for(lambda: cluster.run_of(probe.key, "succeeded"), what="its run")
    assert recorded["tags"]["worker"] in restarted


def test_a_task_dask_gives_up_on_is_labelled_killed_worker(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    report_to(daemon, monkeypatch)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        made = Cluster(daemon)
    try:
        future = made.client.submit(sleep_long, 60)
        first = wait_for(lambda: made.run_of(future.key, "running"), what="the task to run")
        wait_for(lambda: made.in_ledger(future.key), what="the scheduler's ledger entry")
        os.kill(made.worker_pids()[first["tags"]["worker"]], signal.SIGKILL)
        with pytest.raises(distributed.KilledWorker):
            future.result(timeout=60)
        labelled = wait_for(
            lambda: (
                (r := made.run_of(future.key))
                and (r["failure"] or {}).get("category") == "killed_worker"
                and r
            ),
            timeout=10,
            what="the run labelled killed_worker",
        )
        assert labelled["state"] == "failed_crash"
        assert labelled["failure"]["retryable"] is False
        assert "KilledWorker" in labelled["failure"]["message"]
    finally:
        made.close()


def grow(limit_mb: int) -> None:
    chunks = []
    for _ in range(limit_mb * 2 // 20):
        chunks.append(bytearray(20 << 20))
        time.sleep(0.05)


def test_a_worker_the_nanny_restarts_for_memory_is_categorized_oom(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    report_to(daemon, monkeypatch)
    made = Cluster(daemon, n_workers=1, memory_limit="400MiB")
    try:
        future = made.client.submit(grow, 400, retries=0)
        oom = wait_for(
            lambda: (
                (r := made.run_of(future.key))
                and (r["failure"] or {}).get("category") == "oom"
                and r
            ),
            timeout=60,
            what="the run categorized oom",
        )
        assert oom["state"].startswith("failed")
        assert "memory" in oom["failure"]["message"]
        future.cancel()
    finally:
        made.close()


def quick(x: int) -> int:
    return x * 2


def test_a_stopped_daemon_never_slows_tasks_and_gets_every_event_once(cluster: Cluster) -> None:
    assert cluster.daemon.proc is not None
    warm = cluster.client.gather(cluster.client.map(quick, range(4)))
    assert warm == [0, 2, 4, 6]
    cluster.daemon.proc.send_signal(signal.SIGSTOP)
    try:
        futures = cluster.client.map(quick, range(100, 140))
        assert cluster.client.gather(futures, asynchronous=False) == [
            x * 2 for x in range(100, 140)
        ]  # done while the daemon is frozen
    finally:
        cluster.daemon.proc.send_signal(signal.SIGCONT)
    keys = {f.key for f in futures}
    done = wait_for(
        lambda: (
            (runs := [r for r in cluster.runs() if r["tags"]["dask_key"] in keys])
            and len(runs) >= len(keys)
            and all(r["state"] == "succeeded" for r in runs)
            and runs
        ),
        timeout=60,
        what="every frozen-time event to arrive",
    )
    assert sorted(r["tags"]["dask_key"] for r in done) == sorted(keys)  # each exactly once


@pytest.mark.parametrize(
    ("target", "state", "failure_class"),
    [
        ("nanny", "failed_abandoned", "TaskReleased"),
        ("process group", "failed_crash", "Signal:SIGTERM"),
    ],
)
def test_walltime_on_a_real_dask_worker_is_labelled(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, target: str, state: str, failure_class: str
) -> None:
    """SIGTERM to the nanny closes the worker (teardown abandons its task); SIGTERM to the
    whole process group, as a job's walltime does, kills the worker process itself."""
    report_to(daemon, monkeypatch)
    made = Cluster(daemon, n_workers=0)
    worker = start_worker(made.cluster.scheduler_address, dict(os.environ))
    try:
        made.client.wait_for_workers(1, timeout=60)
        future = made.client.submit(sleep_long, 60)
        wait_for(lambda: made.run_of(future.key, "running"), timeout=30, what="the task")
        wait_for(lambda: made.in_ledger(future.key), what="the scheduler's ledger entry")
        if target == "nanny":
            os.kill(worker.pid, signal.SIGTERM)
        else:
            os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
        ended = wait_for(
            lambda: (
                (r := made.run_of(future.key))
                and r["state"] != "running"
                and (r["failure"] or {}).get("category") == "walltime"
                and r
            ),
            timeout=15,
            what="the run to end labelled walltime",
        )
        assert ended["state"] == state
        assert ended["failure"]["failure_class"] == failure_class
        assert ended["failure"]["retryable"] is True
        future.cancel()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        made.close()


def test_two_nodes_each_record_their_own_runs_and_runnerctl_sees_both(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `dask worker` processes, each beside its own daemon, as on two nodes."""
    nodes = [Daemon(short_tmp / name) for name in ("a", "b")]
    for node in nodes:
        node.root.mkdir()
        node.start()
    cluster = distributed.LocalCluster(n_workers=0, dashboard_address=":0")
    client = distributed.Client(cluster)
    client.register_plugin(RunnerdWorkerPlugin(experiment="two-nodes"))
    workers = [start_worker(cluster.scheduler_address, node.env) for node in nodes]
    try:
        client.wait_for_workers(2, timeout=60)
        addresses = sorted(client.scheduler_info()["workers"])
        futures = [client.submit(quick, i, workers=[addresses[i % 2]]) for i in range(10)]
        assert client.gather(futures) == [i * 2 for i in range(10)]
        keys = {f.key for f in futures}

        def recorded(node: Daemon) -> list[dict[str, Any]]:
            return [
                r
                for r in node.ctl_json("list", "--experiment", "two-nodes")
                if r["state"] == "succeeded"
            ]

        wait_for(
            lambda: sum(len(recorded(node)) for node in nodes) == 10,
            timeout=30,
            what="every task recorded",
        )
        for node in nodes:
            assert len({r["tags"]["worker"] for r in recorded(node)}) == 1  # its own worker
        merged = json.loads(
            nodes[0]
            .ctl(
                "--socket",
                str(nodes[0].socket),
                "--socket",
                str(nodes[1].socket),
                "list",
                "--experiment",
                "two-nodes",
                "--json",
            )
            .stdout
        )
        assert sorted(r["tags"]["dask_key"] for r in merged) == sorted(keys)
        assert {r["daemon"] for r in merged} == {str(node.socket) for node in nodes}
    finally:
        client.close()
        cluster.close()
        for worker in workers:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        for node in nodes:
            node.stop()


def test_a_retired_worker_leaves_its_task_labelled_retired(cluster: Cluster) -> None:
    future = cluster.client.submit(sleep_long, 60)
    running = wait_for(lambda: cluster.run_of(future.key, "running"), what="the task to run")
    wait_for(lambda: cluster.in_ledger(future.key), what="the scheduler's ledger entry")
    cluster.client.retire_workers([running["tags"]["worker"]], close_workers=True)
    ended = wait_for(
        lambda: (
            (r := cluster.daemon.ctl_json("show", running["run_id"]))
            and (r["failure"] or {}).get("category") == "retired"
            and r
        ),
        timeout=30,
        what="the run labelled retired",
    )
    assert ended["state"] == "failed_abandoned"  # the worker's teardown abandoned it
    assert ended["failure"]["retryable"] is True
    future.cancel()


def exported_failures(daemon: Daemon) -> dict[str, dict[str, Any]]:
    lines = daemon.ctl("export", "--what", "failures").stdout.splitlines()
    return {record["run_id"]: record for record in map(json.loads, lines)}


def test_a_redispatch_follows_the_dead_dispatch_and_failures_name_task_and_worker(
    cluster: Cluster,
) -> None:
    """After its worker died, Dask's next dispatch of a task is linked to the dead one
    (retry_of), and the exported failure records name the Dask key, the worker and the
    phase (issue 21, items 15 and 16)."""
    future = cluster.client.submit(sleep_long, 60)
    first = wait_for(lambda: cluster.run_of(future.key, "running"), what="the task to run")
    wait_for(lambda: cluster.in_ledger(future.key), what="the scheduler's ledger entry")
    victim = first["tags"]["worker"]
    os.kill(cluster.worker_pids()[victim], signal.SIGKILL)
    again = wait_for(
        lambda: next(
            (
                r
                for r in cluster.runs()
                if r["tags"]["dask_key"] == future.key and r["run_id"] != first["run_id"]
            ),
            None,
        ),
        timeout=30,
        what="Dask's second dispatch on another worker",
    )
    assert again["retry_of"] == first["run_id"]
    future.cancel()
    bad = cluster.client.submit(explode, 3)
    with pytest.raises(ValueError):
        bad.result()
    raised = wait_for(lambda: cluster.run_of(bad.key, "failed_crash"), what="the failed run")
    wait_for(lambda: cluster.run_of(future.key, "failed_crash"), what="the killed run")
    records = exported_failures(cluster.daemon)
    killed = records[first["run_id"]]["details"]
    assert (killed["task_id"], killed["worker_id"], killed["phase"]) == (
        future.key,
        victim,
        "running",
    )
    details = records[raised["run_id"]]["details"]
    assert (details["task_id"], details["worker_id"], details["phase"]) == (
        bad.key,
        raised["tags"]["worker"],
        "running",
    )
    assert details["traceback"].rstrip().endswith("ValueError: no data for shard 3")


def test_a_task_cancelled_after_the_callers_timeout_says_so(cluster: Cluster) -> None:
    """Dask tells neither the worker nor the scheduler's plugins why a caller cancelled a
    task: the record says what it was (released while executing) and what that may be."""
    future = cluster.client.submit(sleep_long, 60)
    wait_for(lambda: cluster.run_of(future.key, "running"), what="the task to run")
    with pytest.raises(TimeoutError):
        future.result(timeout=0.5)
    future.cancel()
    ended = wait_for(
        lambda: cluster.run_of(future.key, "failed_abandoned"),
        timeout=30,
        what="the cancelled task's run",
    )
    assert ended["failure"]["failure_class"] == "TaskReleased"
    assert "cancelled" in ended["failure"]["message"]
    assert "result(timeout=...)" in ended["failure"]["message"]


def probe_run() -> str:
    from runnerd_client import RunRefused

    try:
        run = current_run()
    except RunRefused as exc:
        return f"{exc.code}: {exc.message}"
    return "tracked" if run is not None else "no run"


def test_a_task_whose_run_cannot_be_made_is_told_at_once(cluster: Cluster) -> None:
    """A wrong annotation is no run: current_run() in the task raises why, at once (it
    waited 30 s for a run that never came)."""
    with dask.annotate(runnerd={"params": {"lr": float("nan")}}):
        future = cluster.client.submit(probe_run, pure=False)
    started = time.monotonic()
    assert (
        future.result(timeout=60)
        == "bad_request: params must be plain JSON: it holds NaN or infinity"
    )
    assert time.monotonic() - started < 20
    with dask.annotate(runnerd={"experiment": "dask-test"}):
        tracked = cluster.client.submit(probe_run, pure=False)
    assert tracked.result(timeout=60) == "tracked"
