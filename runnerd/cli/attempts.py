"""`runnerctl exec`: any command as a tracked run, and a true record of how it ended.

The command runs in its own process group with $RUNNERD_RUN_ID set, so a child
that uses the client library joins the same run. Its output is teed to the
terminal and to run_dir/stdout.log and stderr.log. runnerctl itself stays attached
to the run and heartbeats for it, forwards SIGINT/SIGTERM to the group, enforces
--timeout, and ends the run from the exit status unless the command already did.
The processes are `runnerd.cli.launcher`'s, the run's end `runnerd.cli.ending`'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Annotated, Any

from runnerd.cli.ending import record_end
from runnerd.cli.launcher import (
    LOGS,
    CgroupError,
    Launcher,
    Stopped,
    Tee,
    forwarding,
    memory_cgroup,
    open_logs,
    wait,
)
from runnerd.controls import escape_controls
from runnerd.evidence import stopped_note
from runnerd_client.client import Cell, Client
from runnerd_client.fields import Positive, Range, check_argument, check_fields
from runnerd_client.procinfo import cgroup_dir, oom_kills
from runnerd_client.protocol import Create, FailReason, Get, RunnerdError
from runnerd_client.retries import Retries, backoff_delay, worth_retrying
from runnerd_client.run import RUN_ID_ENV, Run
from runnerd_client.tracebacks import CRASH_REPORTS

CHECKPOINT_ENV = "RUNNERD_CHECKPOINT"
CHECKPOINT_DATA_ENV = "RUNNERD_CHECKPOINT_DATA"


PER_ATTEMPT_ENV = (RUN_ID_ENV, CHECKPOINT_ENV, CHECKPOINT_DATA_ENV)
"""Variables each attempt gets afresh: never recorded as the environment to rerun with."""


@dataclass(frozen=True)
class Launch:
    """Everything needed to run a command again as the next attempt (kept on the run)."""

    command: list[str]
    experiment: str
    variation: str = "default"
    params: dict[str, Any] = field(default_factory=dict)
    cwd: str = field(default_factory=os.getcwd)
    env: dict[str, str] = field(default_factory=dict)
    """Variables set on top of the environment (a sweep cell's)."""
    run_dir: str | None = None
    timeout: float | None = None
    memory: int | None = None
    resume: bool = False
    environ: dict[str, str] | None = field(default=None, repr=False)
    """The environment to run with, as recorded with an earlier attempt; None: runnerctl's
    own. Not part of the launch spec shown on the run: kept apart (`show --env`)."""

    @classmethod
    def from_run(cls, run: dict[str, Any], environ: dict[str, str] | None = None) -> Launch:
        """How to rerun `run`, with `environ`, the environment it was launched with (from
        `get` with env); None: it has none recorded, and runs with runnerctl's."""
        spec = run.get("launch")
        if not spec:
            raise RunnerdError("bad_request", f"run {run['run_id']} was not launched by exec")
        return cls(**{k: spec[k] for k in cls.__dataclass_fields__ if k in spec}, environ=environ)

    def spec(self) -> dict[str, Any]:
        """The launch as its runs show it (`launch`): everything but the environment."""
        return {k: v for k, v in asdict(self).items() if k != "environ"}

    def recorded_env(self) -> dict[str, str]:
        """The environment its command runs with, as recorded with its run so that a rerun
        gets it again: the per-attempt variables aside, and those msgpack cannot carry
        (not UTF-8, which os.environ keeps as surrogates)."""
        base = self.environ if self.environ is not None else os.environ
        return {
            k: v
            for k, v in {**base, **self.env}.items()
            if k not in PER_ATTEMPT_ENV and _utf8(k) and _utf8(v)
        }

    def check(self) -> None:
        """Check, before anything is launched, what its runs will be created with, as the
        client checks a request before sending it: TypeError or ValueError naming the
        field (experiment, variation, params, run_dir, timeout, memory)."""
        check_fields(
            Create(
                key="-",
                run_id="-",
                experiment=self.experiment,
                variation=self.variation,
                params=self.params,
                run_dir=self.run_dir,
                launch=self.spec(),
            )
        )
        check_argument("timeout", Positive | None, self.timeout)
        check_argument("memory", Annotated[int, Range(1)] | None, self.memory)


@dataclass
class Outcome:
    """How one attempt ended, for the caller's exit status and retry decision."""

    run: Run
    exit_code: int
    succeeded: bool
    interrupted: bool
    stderr_tail: bytes = b""


@dataclass(frozen=True)
class Attempt:
    """How to run one attempt: where its output goes and what it is linked to."""

    launcher: Launcher
    echo: bool = True
    retry_of: str | None = None
    cell: Cell | None = None


def run_once(client: Client, launch: Launch, how: Attempt) -> Outcome:
    """Launch the command once, as a new attempt of its (experiment, variation)."""
    run = client.run(
        launch.experiment,
        launch.variation,
        params=launch.params,
        run_dir=launch.run_dir,
        retry_of=how.retry_of,
        launch=launch.spec(),
        launch_env=launch.recorded_env(),
        heartbeat_interval=30.0,
        resume=launch.resume,
        cell=how.cell,
    )
    run.start()  # applied before its limits are read back
    run.heartbeat_interval = beat_interval(client, run)
    run.start_heartbeats()
    try:
        logs = open_logs(run.run_dir)
    except OSError as exc:
        run.stop_heartbeats().fail(
            FailReason.CRASH,
            f"cannot write its logs: {exc}",
            failure_class=type(exc).__name__,
            exit_code=126,
        )
        print(f"runnerctl: {escape_controls(str(exc))}", file=sys.stderr)
        return Outcome(run, 126, False, False)
    try:
        with logs[0], logs[1], memory_cgroup(f"runnerd-{run.run_id}", launch.memory) as cgroup:
            return _run_in(run, launch, cgroup, how, logs)
    except CgroupError as exc:
        run.stop_heartbeats().fail(
            FailReason.CRASH, f"--memory: {exc}", failure_class="CgroupError", exit_code=126
        )
        print(f"runnerctl: --memory: {exc}", file=sys.stderr)
        return Outcome(run, 126, False, False)


def beat_interval(client: Client, run: Run) -> float:
    """A quarter of the run's heartbeat_timeout, at most 30 s: a command stopped just
    after a beat is lost within its timeout."""
    reply = client.ask(Get(run=run.run_id)) or {}
    timeout = (reply.get("run") or {}).get("heartbeat_timeout") if reply.get("ok") else None
    return min(30.0, max(0.05, timeout / 4)) if timeout else 30.0


def _environment(run: Run, launch: Launch) -> dict[str, str]:
    """The command's environment: ours (or the one recorded with the run it reruns), the
    launch's, its run, and what it resumes from."""
    base = launch.environ if launch.environ is not None else os.environ
    env = {**CRASH_REPORTS, **base, **launch.env, RUN_ID_ENV: run.run_id}
    checkpoint = run.resume_checkpoint
    if launch.resume:
        env[CHECKPOINT_ENV] = (checkpoint or {}).get("path") or ""
        env[CHECKPOINT_DATA_ENV] = json.dumps((checkpoint or {}).get("data"))
    return env


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _run_in(
    run: Run, launch: Launch, cgroup: Path | None, how: Attempt, logs: tuple[IO[bytes], IO[bytes]]
) -> Outcome:
    command = (
        launch.command
        if cgroup is None
        else ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *launch.command]
    )
    oom_before = oom_kills(cgroup or cgroup_dir("self"))
    try:
        proc = how.launcher.popen(
            command,
            cwd=launch.cwd,
            env=_environment(run, launch),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except Stopped as exc:
        run.stop_heartbeats().fail(
            FailReason.ABANDONED,
            exc.stop.message,
            failure_class=exc.stop.failure_class,
            cause=exc.stop.cause,
        )
        return Outcome(run, 128 + exc.stop.signum, False, True)
    except OSError as exc:
        message = f"cannot run {launch.command[0]}: {exc.strerror or exc}"
        run.stop_heartbeats().fail(
            FailReason.CRASH, message, failure_class=type(exc).__name__, exit_code=127
        )
        if how.echo:
            print(f"runnerctl: {escape_controls(message)}", file=sys.stderr)
        return Outcome(run, 127, False, False)
    assert proc.stdout is not None and proc.stderr is not None
    run.vouch = lambda: stopped_note([proc.pid]) is None  # a stopped command gets no beats
    tees = [
        Tee(proc.stdout, sys.stdout.buffer if how.echo else None, logs[0], run.run_dir / LOGS[0]),
        Tee(proc.stderr, sys.stderr.buffer if how.echo else None, logs[1], run.run_dir / LOGS[1]),
    ]
    for tee in tees:
        tee.start()
    timed_out = wait(proc, launch.timeout)
    stopped = how.launcher.done(proc)
    for tee in tees:
        tee.join()
    run.stop_heartbeats()
    for tee in tees:
        if tee.size:  # an empty log is no product of the run
            run.artifact(tee.log_path)
    rc = proc.returncode
    record_end(
        run,
        rc,
        timed_out=timed_out,
        stopped=stopped,
        timeout=launch.timeout,
        stderr_tail=tees[1].tail,
        cgroup=cgroup or cgroup_dir("self"),
        oom_before=oom_before,
        limit=launch.memory,
    )
    run.flush()
    return Outcome(
        run,
        rc if rc >= 0 else 128 - rc,
        rc == 0 and not timed_out,
        stopped is not None,
        tees[1].tail,
    )


def run_with_retries(
    client: Client,
    launch: Launch,
    retries: Retries,
    how: Attempt,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Outcome:
    """Attempts until one succeeds, retries run out, or a failure is not worth retrying.

    A sweep cell's retries claim the cell after the attempt they follow.
    """
    attempt = 0
    while True:
        attempt += 1
        outcome = run_once(client, launch, how)
        if outcome.succeeded or outcome.interrupted or attempt > retries.retries:
            return outcome
        diagnosis = outcome.run.diagnosis or {}
        category = diagnosis.get("category", "unknown")
        if not worth_retrying(diagnosis, retries.retry_on):
            say(f"runnerctl: attempt {attempt} failed ({category}), not retryable")
            return outcome
        delay = backoff_delay(retries.backoff, attempt)
        say(f"runnerctl: attempt {attempt} failed ({category}); retrying in {delay:.1f} s")
        time.sleep(delay)
        cell = how.cell and replace(how.cell, claim_after=outcome.run.run_id)
        how = replace(how, retry_of=outcome.run.run_id, cell=cell)


def run_in_foreground(
    socket: Path | None, launch: Launch, retries: Retries, retry_of: str | None = None
) -> Outcome:
    """Run a launch with its retries, passing Ctrl-C and SIGTERM on to its command."""
    launcher = Launcher()
    with forwarding(launcher):
        return run_with_retries(
            Client(socket), launch, retries, Attempt(launcher, retry_of=retry_of)
        )
