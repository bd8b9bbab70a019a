"""The quick-start demo: start runnerd if it is not running, run experiments that succeed,
crash, get interrupted, hang, get killed and keep running, and a small sweep, then show
`runnerctl status`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from runnerd_client import paths
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.protocol import Get

HERE = Path(__file__).resolve().parent


def daemon_running() -> bool:
    try:
        Connection(timeout=1.0).close()
    except DaemonUnavailable:
        return False
    return True


def start_daemon() -> int:
    """Start runnerd in the background, logging next to its registry."""
    log_path = paths.db_path().parent / "runnerd.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runnerd"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 15
    while not daemon_running():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"runnerd did not start; see {log_path}")
        time.sleep(0.05)
    print(f"started runnerd (pid {proc.pid}), socket {paths.socket_path()}, log {log_path}")
    return proc.pid


def experiment(mode: str) -> tuple[subprocess.Popen[str], str]:
    """Start the toy experiment; return it and its run id once it has started."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "experiment.py"), mode], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    print(line, end="")
    return proc, line.split()[2]


def finish(proc: subprocess.Popen[str]) -> None:
    out, _ = proc.communicate()
    print(out, end="")


def wait_for_state(run_id: str, state: str, timeout: float = 15.0) -> None:
    """Poll the daemon until a run reaches `state` (the watchdog and death detection at work)."""
    conn = Connection()
    deadline = time.monotonic() + timeout
    while conn.call(Get(run=run_id))["run"]["state"] != state:
        if time.monotonic() > deadline:
            sys.exit(f"run {run_id} did not become {state} within {timeout} s")
        time.sleep(0.1)
    conn.close()


def ctl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "runnerd.cli", *args], check=True)


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    pid = None if daemon_running() else start_daemon()
    print("\n== experiments that succeed, crash, get interrupted, hang, get killed, keep running")
    for mode in ("ok", "crash"):
        finish(experiment(mode)[0])
    interrupted, interrupted_id = experiment("slow")
    hung, hung_id = experiment("hang")
    killed, killed_id = experiment("slow")
    running, _ = experiment("slow")
    interrupted.send_signal(signal.SIGTERM)
    finish(interrupted)
    hung.send_signal(signal.SIGSTOP)
    killed.kill()
    finish(killed)
    wait_for_state(interrupted_id, "failed_abandoned")
    wait_for_state(killed_id, "failed_crash")
    wait_for_state(hung_id, "lost")
    print("\n== a sweep of 4 cells, one failing, under continue_on_failure")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "sweep",
            "run",
            "--experiment",
            "demo-sweep",
            "--grid",
            "x=1,2,3,4",
            "--jobs",
            "2",
            "--failure-policy",
            "continue_on_failure",
            "--",
            sys.executable,
            "-c",
            "import sys; x = {x}; sys.exit(f'x={x} is unlucky' if x == 3 else 0)",
        ]
    )
    print("\n== runnerctl status")
    ctl("status")
    for proc in (hung, running):
        proc.kill()
        proc.communicate()
    if pid is not None:
        print(
            f"\nrunnerd is still running (pid {pid}): try `runnerctl list` and "
            f"`runnerctl show {hung_id}`; stop it with `kill {pid}`."
        )


if __name__ == "__main__":
    main()
