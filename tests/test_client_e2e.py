"""Experiments that use the client library, as real processes against a real daemon."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for

EXPERIMENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import runnerd_client as rd

    mode = sys.argv[1]
    with rd.run("e2e", variation=mode, params={"mode": mode, "lr": 0.1},
                heartbeat_interval=0.05) as run:
        print(run.run_id, flush=True)
        out = Path(run.run_dir) / "model.bin"
        out.write_bytes(b"weights" * 100)
        run.artifact(out)
        run.checkpoint({"epoch": 1}, path=out)
        if mode == "crash":
            raise ValueError(f"loss diverged at step {42}")
        if mode == "exit3":
            sys.exit(3)
        if mode in ("sigint", "sigterm"):
            print("waiting", flush=True)
            time.sleep(60)
""")


def as_in_a_terminal() -> None:
    """Ctrl-C raises KeyboardInterrupt in a script started from a terminal, even when the
    tests themselves run in the background (where the shell makes children ignore SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_experiment(daemon: Daemon, mode: str) -> tuple[subprocess.Popen[str], str]:
    proc = daemon.python(EXPERIMENT, mode, preexec_fn=as_in_a_terminal)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.stderr.read() if proc.stderr else ""
    return proc, run_id


def finished(daemon: Daemon, mode: str) -> tuple[int, dict[str, Any]]:
    proc, run_id = start_experiment(daemon, mode)
    proc.communicate(timeout=30)
    return proc.returncode, daemon.ctl_json("show", run_id)


def test_clean_exit_succeeds_with_artifact_checkpoint_and_metadata(daemon: Daemon) -> None:
    code, run = finished(daemon, "ok")
    assert code == 0
    assert run["state"] == "succeeded"
    assert run["failure"] is None
    assert run["params"] == {"mode": "ok", "lr": 0.1}
    assert run["attempt"] == 1
    assert [t["to"] for t in run["transitions"]] == ["pending", "running", "succeeded"]
    [artifact] = run["artifacts"]
    model = Path(run["run_dir"]) / "model.bin"
    assert artifact["path"] == str(model)
    assert artifact["size"] == 700
    assert artifact["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    [checkpoint] = run["checkpoints"]
    assert checkpoint["data"] == {"epoch": 1}
    assert Path(run["run_dir"]).parent == daemon.root / "data" / "runnerd" / "runs"
    meta = wait_for(lambda: _metadata(run["run_dir"], "succeeded"), what="metadata.json")
    assert meta["run_id"] == run["run_id"]
    assert meta["status"] == "complete"
    assert meta["runtime_sec"] >= 0
    assert meta["failure_class"] is None
    assert not (Path(run["run_dir"]) / "crash.log").exists()


def _metadata(run_dir: str, state: str) -> dict[str, Any] | None:
    path = Path(run_dir) / "metadata.json"
    if not path.exists():
        return None
    meta: dict[str, Any] = json.loads(path.read_text())
    return meta if meta["state"] == state else None


def test_exception_is_failed_crash_with_class_message_traceback(daemon: Daemon) -> None:
    code, run = finished(daemon, "crash")
    assert code == 1
    assert run["state"] == "failed_crash"
    failure = run["failure"]
    assert failure["failure_class"] == "ValueError"
    assert failure["message"] == "loss diverged at step 42"
    assert failure["reason"] == "crash"
    assert "raise ValueError" in failure["traceback"]
    assert len(failure["signature"]) == 16
    meta = wait_for(lambda: _metadata(run["run_dir"], "failed_crash"), what="metadata.json")
    assert meta["failure_class"] == "ValueError"
    assert (meta["status"], meta["failure_reason"]) == ("failed", "loss diverged at step 42")
    # The same bug in another run groups under the same signature.
    _, again = finished(daemon, "crash")
    assert again["attempt"] == 2
    assert again["failure"]["signature"] == failure["signature"]


def test_sys_exit_nonzero_is_a_crash_with_its_code(daemon: Daemon) -> None:
    code, run = finished(daemon, "exit3")
    assert code == 3
    assert run["state"] == "failed_crash"
    assert run["failure"]["failure_class"] == "SystemExit"
    assert run["failure"]["exit_code"] == 3


@pytest.mark.parametrize(
    ("sig", "failure_class", "exit_code"),
    [
        (signal.SIGINT, "KeyboardInterrupt", -signal.SIGINT),
        (signal.SIGTERM, "Terminated", 128 + signal.SIGTERM),
    ],
)
def test_interrupt_and_sigterm_are_abandoned(
    daemon: Daemon, sig: int, failure_class: str, exit_code: int
) -> None:
    proc, run_id = start_experiment(daemon, "sigint" if sig == signal.SIGINT else "sigterm")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "waiting"
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    assert proc.returncode == exit_code
    run = daemon.ctl_json("show", run_id)
    assert run["state"] == "failed_abandoned"
    assert run["failure"]["reason"] == "abandoned"
    assert run["failure"]["failure_class"] == failure_class
    listed = {r["run_id"]: r for r in daemon.ctl_json("list")}
    assert listed[run_id]["state"] == "failed_abandoned"


def test_heartbeats_arrive_while_the_run_works(daemon: Daemon) -> None:
    proc, run_id = start_experiment(daemon, "sigterm")
    wait_for(lambda: daemon.ctl_json("show", run_id)["heartbeats"] >= 3, what="heartbeats")
    proc.terminate()
    proc.communicate(timeout=30)


CONCURRENT_CLIENT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import runnerd_client as rd

    n = int(sys.argv[1])
    with rd.run("many", variation=f"client-{n}", heartbeat_interval=3600) as run:
        for _ in range(200):
            run.heartbeat()
        out = Path(run.run_dir) / "result.txt"
        out.write_text(f"client {n}")
        run.artifact(out)
    print(run.run_id)
""")


def test_32_clients_at_once_every_event_stored_once(daemon: Daemon) -> None:
    procs = [daemon.python(CONCURRENT_CLIENT, str(n)) for n in range(32)]
    run_ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "refused" not in err and "not reachable" not in err, err
        run_ids.append(out.strip())
    runs = {r["run_id"]: r for r in daemon.ctl_json("list", "--experiment", "many")}
    assert set(runs) == set(run_ids)
    for run_id in run_ids:
        run = daemon.ctl_json("show", run_id)
        assert run["state"] == "succeeded"
        assert run["heartbeats"] == 200
        assert len(run["artifacts"]) == 1
        assert [t["to"] for t in run["transitions"]] == ["pending", "running", "succeeded"]


def test_current_run_attaches_a_child_process(daemon: Daemon) -> None:
    parent = textwrap.dedent("""
        import os, subprocess, sys
        import runnerd_client as rd
        with rd.run("family") as run:
            env = dict(os.environ, RUNNERD_RUN_ID=run.run_id)
            child = "import runnerd_client as rd\\n" \\
                    "with rd.current_run() as run: print(run.experiment, run.attempt)"
            out = subprocess.run([sys.executable, "-c", child], env=env, check=True,
                                 capture_output=True, text=True).stdout
            print(run.run_id, os.getpid(), out.strip())
    """)
    proc = daemon.python(parent)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    run_id, parent_pid, experiment, attempt = out.split()
    assert (experiment, attempt) == ("family", "1")
    run = daemon.ctl_json("show", run_id)
    assert run["state"] == "succeeded"
    assert run["pids"] == [int(parent_pid)]  # the child detached when its block ended


def test_experiment_runs_untracked_when_the_daemon_is_away(short_tmp: Path) -> None:
    away = Daemon(short_tmp)
    code = "import runnerd_client as rd\nwith rd.run('x') as run:\n    print('worked')"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=away.env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == "worked"
    assert proc.stderr.count("not reachable") == 1


def test_explicit_calls_chain(daemon: Daemon) -> None:
    code = textwrap.dedent("""
        import runnerd_client as rd
        client = rd.connect()
        run = client.run("explicit", variation="v", params={"k": 1})
        print(run.run_id, run.attempt)
        run.start().heartbeat().fail(reason="abandoned", message="gave up")
    """)
    proc = daemon.python(code)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    run_id, attempt = out.split()
    assert attempt == "1"
    run = daemon.ctl_json("show", run_id)
    assert run["state"] == "failed_abandoned"
    assert run["failure"]["message"] == "gave up"
