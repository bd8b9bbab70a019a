"""MLflow records made true: real mlflow with a sqlite store, real scripts, real signals.

Each script is unmodified MLflow code run under `runnerctl exec`, in `with rd.run()`, or on
its own with the `RUNNERD_MLFLOW=1` opt-in, against a daemon whose config.toml has the
shipped hook (`deliver` also hands it an event directly, as the daemon would).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for

mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[test]')")
from mlflow.client import MlflowClient  # noqa: E402
from mlflow.entities import Run as MlflowRun  # noqa: E402
from mlflow.entities import ViewType  # noqa: E402

pytestmark = [
    pytest.mark.timeout(300),
    # MLflow's own sqlite store, read in this process, uses deprecated SQLAlchemy options.
    pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning"),
]


HOOK = f"""
[[hooks]]
name = "mlflow"
events = ["failed_*", "lost"]
mode = "stream"
command = {json.dumps([sys.executable, "-m", "runnerd_client.mlflow", "hook"])}
"""


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    """One daemon for the module, with the MLflow hook in its config.toml."""
    with tempfile.TemporaryDirectory(prefix="rd-", dir="/tmp") as name:
        daemon = Daemon(Path(name))
        daemon.config.parent.mkdir(parents=True)
        daemon.config.write_text(HOOK)
        daemon.start()
        try:
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture(scope="module")
def store(shared_daemon: Daemon) -> Iterator[str]:
    """One sqlite tracking store for the module, its tables made here once: two scripts
    making them at once on a new store race in MLflow's own migrations."""
    from mlflow.client import MlflowClient

    uri = f"sqlite:///{shared_daemon.root}/mlflow.db"
    MlflowClient(uri).search_experiments(max_results=1)
    yield uri


def env_for(daemon: Daemon, uri: str, **extra: str) -> dict[str, str]:
    return {**daemon.env, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", **extra}


def script(daemon: Daemon, name: str, code: str) -> Path:
    path = daemon.root / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return path


def exec_(
    daemon: Daemon, uri: str, experiment: str, path: Path, **kwargs: Any
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "exec",
            "--experiment",
            experiment,
            "--",
            sys.executable,
            str(path),
        ],
        env=env_for(daemon, uri),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def only_run(daemon: Daemon, experiment: str) -> dict[str, Any]:
    runs = daemon.ctl_json("list", "--experiment", experiment)
    assert len(runs) == 1, runs
    run: dict[str, Any] = daemon.ctl_json("show", runs[0]["run_id"])
    return run


def mlflow_runs(uri: str, run_id: str) -> list[MlflowRun]:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return list(client.search_runs(experiments, f"tags.`runnerd.run_id` = '{run_id}'"))


def deliver(daemon: Daemon, run_id: str, uri: str) -> subprocess.CompletedProcess[str]:
    """Give the shipped hook the event of the run's last state change, as the daemon does."""
    run = daemon.ctl_json("show", run_id)
    event = {
        "seq": 1,
        "kind": "state",
        "name": run["state"],
        "run_id": run_id,
        "experiment": run["experiment"],
        "variation": run["variation"],
        "tags": run["tags"],
        "at": run["ended_at"],
        "data": {},
    }
    env = {
        **env_for(daemon, uri),
        "RUNNERD_HOOK": "mlflow",
        "RUNNERD_EVENT": run["state"],
        "RUNNERD_RUN_ID": run_id,
        "RUNNERD_STATE": run["state"],
        "RUNNERD_EXPERIMENT": run["experiment"],
    }
    return subprocess.run(
        [sys.executable, "-m", "runnerd_client.mlflow", "hook"],
        input=json.dumps({"hook": "mlflow", "event": event, "run": run}),
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )


def statuses(uri: str, run_id: str) -> list[str]:
    return sorted(r.info.status for r in mlflow_runs(uri, run_id))


def settled(uri: str, run_id: str, expected: list[str]) -> None:
    """Wait for the hook to have brought the MLflow runs to `expected`."""
    wait_for(
        lambda: statuses(uri, run_id) == expected,
        timeout=60,
        what=f"MLflow runs of {run_id} to be {expected}",
    )


def names(uri: str, run_id: str) -> dict[str, str]:
    return {r.info.run_name: r.info.status for r in mlflow_runs(uri, run_id)}


def started(proc: subprocess.Popen[str]) -> int:
    """The pid a script prints once its MLflow run has started."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), (line, proc.stderr.read() if proc.stderr else "")
    return int(line.split()[1])


TRAIN_OK = """
    import mlflow
    with mlflow.start_run():
        mlflow.log_param("lr", 0.1)
        mlflow.log_metric("loss", 0.5)
"""

WAIT = """
    import os, time
    import mlflow
    mlflow.start_run()
    mlflow.log_param("lr", 0.1)
    print("ready", os.getpid(), flush=True)
    time.sleep(300)
"""


def test_a_succeeding_script_is_linked_both_ways(shared_daemon: Daemon, store: str) -> None:
    proc = exec_(shared_daemon, store, "ml-ok", script(shared_daemon, "ok", TRAIN_OK))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    run = only_run(shared_daemon, "ml-ok")
    assert run["state"] == "succeeded"
    (linked,) = mlflow_runs(store, run["run_id"])
    assert linked.info.status == "FINISHED"
    assert linked.data.params == {"lr": "0.1"}
    assert linked.data.tags["runnerd.experiment"] == "ml-ok"
    note = next(a["path"] for a in run["artifacts"] if Path(a["path"]).name.startswith("mlflow-"))
    recorded = json.loads(Path(note).read_text())
    assert recorded["tracking_uris"] == [store]
    assert [r["run_id"] for r in recorded["mlflow_runs"]] == [linked.info.run_id]
    assert deliver(shared_daemon, run["run_id"], store).returncode == 0
    assert statuses(store, run["run_id"]) == ["FINISHED"]  # a success is left alone


def test_an_uncaught_exception_ends_the_mlflow_run_failed(
    shared_daemon: Daemon, store: str
) -> None:
    code = """
        import mlflow
        mlflow.start_run()
        mlflow.log_param("lr", 0.1)
        raise ValueError("loss is nan")
    """
    proc = exec_(shared_daemon, store, "ml-raise", script(shared_daemon, "raise", code))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "loss is nan" in err
    run = only_run(shared_daemon, "ml-raise")
    assert run["state"] == "failed_crash"
    assert "loss is nan" in run["failure"]["message"]
    assert statuses(store, run["run_id"]) == ["FAILED"]  # MLflow alone says FINISHED


def test_the_hook_corrects_finished_at_exit_and_leaves_what_the_script_ended(
    shared_daemon: Daemon, store: str
) -> None:
    code = """
        import sys
        import mlflow
        with mlflow.start_run(run_name="ended-by-the-script"):
            mlflow.log_metric("loss", 0.1)
        mlflow.start_run(run_name="left-to-mlflow")
        sys.exit(3)
    """
    proc = exec_(shared_daemon, store, "ml-exit", script(shared_daemon, "exit3", code))
    proc.communicate(timeout=120)
    assert proc.returncode == 3
    run = only_run(shared_daemon, "ml-exit")
    assert (run["state"], run["failure"]["exit_code"]) == ("failed_crash", 3)
    settled(store, run["run_id"], ["FAILED", "FINISHED"])  # MLflow alone: both FINISHED
    assert names(store, run["run_id"]) == {
        "ended-by-the-script": "FINISHED",
        "left-to-mlflow": "FAILED",
    }
    result = deliver(shared_daemon, run["run_id"], store)  # delivered again: no change
    assert result.returncode == 0, result.stderr
    assert names(store, run["run_id"]) == {
        "ended-by-the-script": "FINISHED",
        "left-to-mlflow": "FAILED",
    }


@pytest.mark.parametrize(
    ("sig", "state", "status"),
    [
        (signal.SIGKILL, "failed_crash", "FAILED"),
        (signal.SIGTERM, "failed_abandoned", "KILLED"),
    ],
)
def test_a_killed_script_ends_its_mlflow_run_through_the_hook(
    shared_daemon: Daemon, store: str, sig: signal.Signals, state: str, status: str
) -> None:
    experiment = f"ml-{sig.name}"
    proc = exec_(shared_daemon, store, experiment, script(shared_daemon, "wait", WAIT))
    pid = started(proc)
    run_id = wait_for(
        lambda: shared_daemon.ctl_json("list", "--experiment", experiment), what="the run"
    )[0]["run_id"]
    assert statuses(store, run_id) == ["RUNNING"]  # what MLflow alone keeps saying
    # SIGKILL hits the script itself; SIGTERM goes to runnerctl, as scancel sends it.
    os.kill(pid if sig == signal.SIGKILL else proc.pid, sig)
    proc.communicate(timeout=60)
    run = only_run(shared_daemon, experiment)
    assert run["state"] == state
    settled(store, run_id, [status])
    (linked,) = mlflow_runs(store, run_id)
    assert linked.info.status == status
    assert linked.data.tags["runnerd.state"] == state
    assert linked.info.end_time is not None


def hook_processes(daemon: Daemon) -> list[int]:
    """The daemon's children running the MLflow hook."""
    assert daemon.proc is not None
    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == daemon.proc.pid and b"runnerd_client.mlflow" in argv:
            found.append(int(proc.name))
    return found


def test_one_stream_process_ends_the_mlflow_runs_of_every_killed_script(
    shared_daemon: Daemon, store: str
) -> None:
    (hook,) = wait_for(lambda: hook_processes(shared_daemon), what="the hook's process")
    procs = [
        exec_(shared_daemon, store, f"ml-many-{n}", script(shared_daemon, "wait", WAIT))
        for n in range(2)
    ]
    pids = [started(proc) for proc in procs]
    run_ids = [only_run(shared_daemon, f"ml-many-{n}")["run_id"] for n in range(2)]
    for pid, proc in zip(pids, procs, strict=True):
        os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    for run_id in run_ids:
        settled(store, run_id, ["FAILED"])
    assert hook_processes(shared_daemon) == [hook]  # MLflow imported once, for both
    status = {h["name"]: h for h in shared_daemon.ctl_json("hooks")["hooks"]}["mlflow"]
    assert status["mode"] == "stream" and status["last"]["ok"] is True


def test_the_stream_hook_answers_each_event_line_on_its_own(
    shared_daemon: Daemon, tmp_path: Path
) -> None:
    """A stream answers each event line on its own; it imports MLflow before the first
    event, but never opens (so creates) a store no event needed: that would race the
    user's own first run on a new store."""
    new_store = tmp_path / "new.db"
    lines = [
        "{not json",
        json.dumps({"hook": "mlflow", "event": {"seq": 7}, "run": None}),
        json.dumps(
            {
                "hook": "mlflow",
                "event": {"seq": 8},
                "run": {"run_id": "X", "state": "failed_crash", "artifacts": [], "pids": []},
            }
        ),
    ]
    stream = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "runnerd_client.mlflow", "hook"],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        env={
            **shared_daemon.env,
            "RUNNERD_HOOK_MODE": "stream",
            "MLFLOW_TRACKING_URI": f"sqlite:///{new_store}",
        },
        timeout=120,
    )
    assert stream.returncode == 0, stream.stderr  # its stdin closed: done
    assert not new_store.exists()
    bad, pruned, unlinked = map(json.loads, stream.stdout.splitlines())  # answers only
    assert bad["ok"] is False and "not JSON" in bad["error"] and "seq" not in bad
    assert pruned == {"ok": True, "seq": 7} and unlinked == {"ok": True, "seq": 8}
    assert "mlflow.client" in stream.stderr  # imported before the first event, once


def test_an_mlflow_run_in_a_with_rd_run_block_is_linked(shared_daemon: Daemon, store: str) -> None:
    code = """
        import mlflow
        import runnerd_client as rd
        with rd.run("ml-block", params={"lr": 0.1}):
            with mlflow.start_run():
                mlflow.log_metric("loss", 0.2)
    """
    proc = subprocess.run(
        [sys.executable, str(script(shared_daemon, "block", code))],
        env=env_for(shared_daemon, store),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    run = only_run(shared_daemon, "ml-block")
    assert run["state"] == "succeeded"
    assert statuses(store, run["run_id"]) == ["FINISHED"]


PLAIN = """
    import os, sys, time
    import mlflow
    mlflow.start_run()
    mlflow.log_param("mode", sys.argv[1])
    print("ready", os.getpid(), flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("diverged")
    if sys.argv[1] == "wait":
        time.sleep(300)
"""


def opted_in(daemon: Daemon, uri: str, mode: str, experiment: str) -> subprocess.Popen[str]:
    path = daemon.root / "plain_optin.py"
    if not path.exists():
        script(daemon, "plain_optin", PLAIN)
    env = env_for(daemon, uri, RUNNERD_MLFLOW="1", RUNNERD_EXPERIMENT=experiment)
    return subprocess.Popen(
        [sys.executable, str(path), mode],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize(
    ("mode", "sig", "state", "failure_class", "status"),
    [
        ("ok", None, "succeeded", None, "FINISHED"),
        ("raise", None, "failed_crash", "RuntimeError", "FAILED"),
        ("wait", signal.SIGTERM, "failed_abandoned", "Terminated", "KILLED"),
        ("wait", signal.SIGKILL, "failed_crash", "ProcessExited", "FAILED"),
    ],
)
def test_the_opt_in_makes_a_plain_script_its_own_run(
    shared_daemon: Daemon,
    store: str,
    mode: str,
    sig: signal.Signals | None,
    state: str,
    failure_class: str | None,
    status: str,
) -> None:
    experiment = f"ml-optin-{mode}{sig.name if sig else ''}"
    proc = opted_in(shared_daemon, store, mode, experiment)
    pid = started(proc)
    if sig is not None:
        os.kill(pid, sig)
    proc.communicate(timeout=120)
    run = wait_for(
        lambda: shared_daemon.ctl_json("list", "--experiment", experiment), what="the opt-in's run"
    )[0]
    run = wait_for(
        lambda: (
            (r := shared_daemon.ctl_json("show", run["run_id"]))["state"]
            not in ("pending", "running")
            and r
        ),
        what="the run to end",
    )
    assert run["state"] == state
    assert (run["failure"] or {}).get("failure_class") == failure_class
    settled(store, run["run_id"], [status])
    (linked,) = mlflow_runs(store, run["run_id"])
    assert linked.data.params == {"mode": mode}


def test_the_hook_refuses_bad_input_and_ignores_unlinked_runs(
    shared_daemon: Daemon, store: str
) -> None:
    hook = [sys.executable, "-m", "runnerd_client.mlflow", "hook"]
    bad = subprocess.run(
        hook, input="{not json", capture_output=True, text=True, env=shared_daemon.env, timeout=60
    )
    assert bad.returncode == 1 and "not JSON" in bad.stderr
    unlinked = {
        "hook": "mlflow",
        "event": {},
        "run": {"run_id": "X", "state": "failed_crash", "artifacts": [], "pids": []},
    }
    quiet = subprocess.run(
        [sys.executable, "-X", "importtime", *hook[1:]],
        input=json.dumps(unlinked),
        capture_output=True,
        text=True,
        env=shared_daemon.env,
        timeout=60,
    )
    assert quiet.returncode == 0
    assert "mlflow.client" not in quiet.stderr  # MLflow is imported only when needed
    pruned = subprocess.run(
        hook,
        input=json.dumps({"hook": "mlflow", "event": {}, "run": None}),
        capture_output=True,
        text=True,
        env=shared_daemon.env,
        timeout=60,
    )
    assert pruned.returncode == 0, pruned.stderr
