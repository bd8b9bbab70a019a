"""Liveness with real processes and signals: deaths, hangs, deadlines, daemon restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from conftest import Daemon, wait_for

WORKER = textwrap.dedent("""
    import os, sys, time
    import runnerd_client as rd
    kwargs = dict(heartbeat_interval=float(sys.argv[1]))
    for name, value in zip(("heartbeat_timeout", "lost_grace", "deadline"), sys.argv[2:]):
        if value != "-":
            kwargs[name] = float(value)
    with rd.run("liveness", **kwargs) as run:
        print(run.run_id, flush=True)
        while True:
            time.sleep(0.05)
""")


def worker(
    daemon: Daemon,
    procs: list[subprocess.Popen[str]],
    interval: float = 60.0,
    timeout: str = "-",
    grace: str = "-",
    deadline: str = "-",
) -> tuple[int, str]:
    proc = daemon.python(WORKER, str(interval), timeout, grace, deadline)
    procs.append(proc)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.stderr.read() if proc.stderr else ""
    return proc.pid, run_id


def show(daemon: Daemon, run_id: str) -> dict[str, Any]:
    run: dict[str, Any] = daemon.ctl_json("show", run_id)
    return run


def reaches(daemon: Daemon, run_id: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
    return wait_for(
        lambda: (r := show(daemon, run_id))["state"] == state and r,
        timeout=timeout,
        interval=0.05,
        what=f"{run_id} to be {state}",
    )


def test_sigkilled_client_is_failed_crash_process_exited(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    pid, run_id = worker(daemon, procs)
    assert show(daemon, run_id)["state"] == "running"
    os.kill(pid, signal.SIGKILL)
    run = reaches(daemon, run_id, "failed_crash")
    assert run["failure"]["failure_class"] == "ProcessExited"
    assert run["failure"]["reason"] == "crash"
    assert str(pid) in run["failure"]["message"]
    assert run["transitions"][-1]["source"] == "watchdog"
    assert "ProcessExited" in daemon.ctl("show", run_id).stdout


def test_run_dies_with_its_last_attached_process(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    parent_pid, run_id = worker(daemon, procs)
    child_code = textwrap.dedent("""
        import time
        import runnerd_client as rd
        run = rd.current_run()
        print(run.run_id, flush=True)
        while True:
            time.sleep(0.05)
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", child_code],
        env={**daemon.env, "RUNNERD_RUN_ID": run_id},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(child)
    assert child.stdout is not None and child.stdout.readline().strip() == run_id
    wait_for(lambda: len(show(daemon, run_id)["pids"]) == 2, what="two attached pids")
    child.kill()
    wait_for(lambda: show(daemon, run_id)["pids"] == [parent_pid], what="child dropped")
    assert show(daemon, run_id)["state"] == "running"
    os.kill(parent_pid, signal.SIGKILL)
    assert reaches(daemon, run_id, "failed_crash")["failure"]["failure_class"] == "ProcessExited"


def test_stopped_client_goes_lost_stopped_then_recovers_on_its_next_heartbeat(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    pid, run_id = worker(daemon, procs, interval=0.2, timeout="1")
    os.kill(pid, signal.SIGSTOP)
    run = reaches(daemon, run_id, "lost")
    assert run["transitions"][-1]["cause"] == "stopped"
    assert run["transitions"][-1]["source"] == "watchdog"
    os.kill(pid, signal.SIGCONT)
    run = reaches(daemon, run_id, "running")
    assert run["transitions"][-1]["cause"] == "heartbeat"


def test_a_live_client_that_stops_beating_goes_lost_heartbeat_missed(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    _pid, run_id = worker(daemon, procs, interval=60, timeout="1")
    run = reaches(daemon, run_id, "lost")
    assert run["transitions"][-1]["cause"] == "heartbeat_missed"


def test_lost_run_past_its_grace_is_failed_lost(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    pid, run_id = worker(daemon, procs, interval=0.2, timeout="0.5", grace="0.5")
    os.kill(pid, signal.SIGSTOP)
    run = reaches(daemon, run_id, "failed_lost")
    assert [t["to"] for t in run["transitions"]][-2:] == ["lost", "failed_lost"]
    assert run["failure"]["failure_class"] == "HeartbeatLost"
    assert run["failure"]["reason"] == "lost"
    os.kill(pid, signal.SIGCONT)


def test_run_past_its_deadline_is_failed_timeout(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    _, run_id = worker(daemon, procs, interval=0.2, deadline="1")
    run = reaches(daemon, run_id, "failed_timeout")
    assert run["failure"]["failure_class"] == "Timeout"
    assert run["failure"]["reason"] == "timeout"
    assert "deadline" in run["failure"]["message"]


def test_restart_marks_runs_whose_process_died_meanwhile_crashed_and_keeps_live_ones(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    first = Daemon(short_tmp).start()
    doomed_pid, doomed = worker(first, procs)
    _, alive = worker(first, procs, interval=0.2, deadline="3")
    first.stop(signal.SIGKILL)
    os.kill(doomed_pid, signal.SIGKILL)
    procs[0].communicate(timeout=30)
    second = Daemon(short_tmp).start()
    try:
        run = show(second, doomed)
        assert run["state"] == "failed_crash"
        assert run["failure"]["failure_class"] == "ProcessExited"
        assert "while runnerd was down" in run["failure"]["message"]
        assert run["transitions"][-1]["source"] == "reconciler"
        assert show(second, alive)["state"] == "running"
        # Its timer was re-armed from the persisted start time.
        assert reaches(second, alive, "failed_timeout")["failure"]["failure_class"] == "Timeout"
    finally:
        second.stop()


def test_restarted_daemon_still_notices_a_death(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    first = Daemon(short_tmp).start()
    pid, run_id = worker(first, procs)
    first.stop(signal.SIGKILL)
    second = Daemon(short_tmp).start()
    try:
        assert show(second, run_id)["state"] == "running"
        os.kill(pid, signal.SIGKILL)
        assert (
            reaches(second, run_id, "failed_crash")["failure"]["failure_class"] == "ProcessExited"
        )
    finally:
        second.stop()
