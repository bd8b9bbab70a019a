"""The quick-start demo: start runnerd if it is not running, run a few experiments that
succeed, crash, get interrupted and keep running, then show `runnerctl status`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from runnerd_client import paths
from runnerd_client.connection import Connection, DaemonUnavailable

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
        proc = subprocess.Popen([sys.executable, "-m", "runnerd"], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 15
    while not daemon_running():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"runnerd did not start; see {log_path}")
        time.sleep(0.05)
    print(f"started runnerd (pid {proc.pid}), socket {paths.socket_path()}, log {log_path}")
    return proc.pid


def experiment(mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(HERE / "experiment.py"), mode])


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    pid = None if daemon_running() else start_daemon()
    print("\n== an experiment that succeeds, one that crashes, one interrupted, one still running")
    for mode in ("ok", "crash"):
        experiment(mode).wait()
    interrupted = experiment("slow")
    still_running = experiment("slow")
    time.sleep(1.0)
    interrupted.send_signal(signal.SIGTERM)
    interrupted.wait()
    print("\n== runnerctl status")
    subprocess.run([sys.executable, "-m", "runnerd.cli", "status"], check=True)
    still_running.send_signal(signal.SIGINT)
    still_running.wait()
    print("\n== runnerctl list (the last run was interrupted with Ctrl-C after the status above)")
    subprocess.run([sys.executable, "-m", "runnerd.cli", "list", "--limit", "5"], check=True)
    if pid is not None:
        print(f"\nrunnerd is still running (pid {pid}); try `runnerctl show <RUN>`, "
              f"stop it with `kill {pid}`.")


if __name__ == "__main__":
    main()
