"""`runnerctl sweep run --dask`: a cell's command, run on a Dask worker as its task.

Needs nothing from `distributed`: the worker plugin imports it to record a failed command
as `exec` would, and to stop a command whose task Dask released (fail_fast cancels it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runnerd_client.cells import substitute
from runnerd_client.run import ACTIVE, RUN_ID_ENV
from runnerd_client.tracebacks import CRASH_REPORTS, command_ending

TAIL = 65536
_running: dict[str, int] = {}  # run id -> the process group of its command
_running_lock = threading.Lock()


class CommandFailed(Exception):
    """A sweep cell's command that did not exit 0 on its worker."""

    def __init__(
        self,
        message: str,
        failure_class: str,
        exit_code: int,
        signal: str | None = None,
        traceback: str | None = None,
    ) -> None:
        super().__init__(message)
        self.failure_class, self.exit_code, self.signal = failure_class, exit_code, signal
        self.traceback = traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            CommandFailed,
            (str(self), self.failure_class, self.exit_code, self.signal, self.traceback),
        )


@dataclass(frozen=True)
class CommandCell:
    """A cell's command. Its output goes to stdout.log and stderr.log in the run's folder
    (artifacts if not empty); a non-zero exit raises CommandFailed, which the plugin
    records like `exec` would."""

    command: tuple[str, ...]
    cwd: str
    timeout: float | None = None

    def __call__(self, **params: Any) -> int:
        run = ACTIVE.get()
        folder = run.run_dir if run is not None else Path(self.cwd)
        folder.mkdir(parents=True, exist_ok=True)
        env = {
            **CRASH_REPORTS,
            **os.environ,
            **({RUN_ID_ENV: run.run_id} if run is not None else {}),
        }
        logs = [folder / "stdout.log", folder / "stderr.log"]
        with open(logs[0], "wb") as out, open(logs[1], "wb") as err:
            proc = subprocess.Popen(
                substitute(self.command, params),
                cwd=self.cwd,
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            code = _wait(proc, run.run_id if run is not None else None, self.timeout)
        for log_path in logs:
            if run is not None and log_path.stat().st_size:
                run.artifact(log_path)
        if code != 0:
            raise command_failure(code, logs[1].read_bytes()[-TAIL:])
        return code


def _wait(proc: subprocess.Popen[bytes], run_id: str | None, timeout: float | None) -> int:
    """The command's exit status; it is killed past `timeout`, and whoever releases its
    task meanwhile may stop it (`stop_command`)."""
    if run_id is not None:
        with _running_lock:
            _running[run_id] = proc.pid
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()
    finally:
        with _running_lock:
            _running.pop(run_id or "", None)


def stop_command(run_id: str) -> None:
    """SIGTERM the command of a run whose task Dask released (cancelled by fail_fast)."""
    with _running_lock:
        group = _running.get(run_id)
    if group is not None:
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass


def command_failure(code: int, stderr_tail: bytes) -> CommandFailed:
    """How the command ended, read from its stderr as `runnerctl exec` reads it."""
    ending = command_ending(stderr_tail, code)
    return CommandFailed(
        ending.message,
        ending.failure_class,
        code if code > 0 else 128 - code,
        ending.signal,
        ending.traceback,
    )
