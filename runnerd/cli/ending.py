"""The end of a launched run, recorded from how its command ended: its exit status, a
signal (an OOM kill named), --timeout, or runnerctl stopping it."""

from __future__ import annotations

import signal
from pathlib import Path

from runnerd.cli.launcher import Stop
from runnerd.usage import gib
from runnerd_client.procinfo import cgroup_peak, oom_kills
from runnerd_client.protocol import FailReason
from runnerd_client.run import Run
from runnerd_client.tracebacks import command_ending


def record_end(
    run: Run,
    rc: int,
    *,
    timed_out: bool,
    stopped: Stop | None,
    timeout: float | None,
    stderr_tail: bytes,
    cgroup: Path | None,
    oom_before: int | None,
    limit: int | None = None,
) -> None:
    """End the run from the command's exit status, unless the command already ended it
    (through the client library): its own report wins, and the daemon decides which came
    first."""
    if stopped is not None:
        run.fail(
            FailReason.ABANDONED,
            stopped.message,
            failure_class=stopped.failure_class,
            cause=stopped.cause,
            if_active=True,
        )
    elif timed_out:
        run.fail(
            FailReason.TIMEOUT,
            f"command exceeded --timeout of {timeout:g} s",
            failure_class="Timeout",
            exit_code=rc,
            if_active=True,
        )
    elif rc == 0:
        run.succeed(if_active=True)
    elif rc > 0:
        ending = command_ending(stderr_tail, rc)
        run.fail(
            FailReason.CRASH,
            ending.message,
            failure_class=ending.failure_class,
            exit_code=rc,
            traceback=ending.traceback,
            if_active=True,
        )
    else:
        name = signal.Signals(-rc).name
        oom = name == "SIGKILL" and oom_before is not None and (oom_kills(cgroup) or 0) > oom_before
        peak = cgroup_peak(cgroup) if limit else None
        killer = (
            f" (OOM killer, peak {gib(peak)} of a {gib(limit)} limit)"
            if oom and peak and limit
            else " (OOM killer)"
            if oom
            else ""
        )
        ending = command_ending(stderr_tail, rc, killer)
        run.fail(
            FailReason.CRASH,
            ending.message,
            failure_class=ending.failure_class,
            signal=name,
            exit_code=rc,
            traceback=ending.traceback,
            category_hint="oom" if oom else None,
            if_active=True,
        )
