"""`runnerctl exec`: any command as a tracked run, and a true record of how it ended.

The command runs in its own process group with $RUNNERD_RUN_ID set, so a child
that uses the client library joins the same run. Its output is teed to the
terminal and to run_dir/stdout.log and stderr.log. runnerctl itself stays attached
to the run and heartbeats for it, forwards SIGINT/SIGTERM to the group, enforces
--timeout, and ends the run from the exit status unless the command already did.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from runnerd.resources import cgroup_dir, cgroup_peak, gib, oom_kills
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.protocol import FailReason, Get, RunnerdError, State
from runnerd_client.run import RUN_ID_ENV, Client, Run

KILL_AFTER = 5.0
TAIL = 64 * 1024
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*$", re.M)


@dataclass(frozen=True)
class Launch:
    """Everything needed to run a command again as the next attempt (kept on the run)."""

    command: list[str]
    experiment: str
    variation: str = "default"
    params: dict[str, Any] = field(default_factory=dict)
    cwd: str = field(default_factory=os.getcwd)
    env: dict[str, str] = field(default_factory=dict)
    run_dir: str | None = None
    timeout: float | None = None
    memory: int | None = None

    @classmethod
    def from_run(cls, run: dict[str, Any]) -> Launch:
        spec = run.get("launch")
        if not spec:
            raise RunnerdError("bad_request", f"run {run['run_id']} was not launched by exec")
        return cls(**{k: spec[k] for k in cls.__dataclass_fields__ if k in spec})


@dataclass
class Outcome:
    """How one attempt ended, for the caller's exit status and retry decision."""

    run: Run
    exit_code: int
    succeeded: bool
    interrupted: bool


class Tee(threading.Thread):
    """Copy a child's output to the terminal and to a log file as it comes."""

    def __init__(self, source: IO[bytes], terminal: IO[bytes], log_path: Path) -> None:
        super().__init__(daemon=True)
        self.source, self.terminal, self.log_path = source, terminal, log_path
        self.tail = b""

    def run(self) -> None:
        with open(self.log_path, "wb") as log:
            while chunk := os.read(self.source.fileno(), 1 << 16):
                log.write(chunk)
                self.terminal.write(chunk)
                self.terminal.flush()
                self.tail = (self.tail + chunk)[-TAIL:]


class CgroupError(Exception):
    """A memory cgroup for --memory cannot be made here; the message says why."""


@contextmanager
def memory_cgroup(name: str, limit: int | None) -> Iterator[Path | None]:
    """A memory cgroup of the run's own under ours, limited to `limit` bytes, removed after."""
    if limit is None:
        yield None
        return
    own = cgroup_dir("self")
    if own is None:
        raise CgroupError("no memory cgroup controller is mounted here")
    folder = own / name
    try:
        folder.mkdir()
        knob = "memory.max" if (folder / "memory.max").exists() else "memory.limit_in_bytes"
        (folder / knob).write_text(str(limit))
        if (folder / "memory.swappiness").exists():
            (folder / "memory.swappiness").write_text("0")  # over the limit: OOM, not swap
    except OSError as exc:
        raise CgroupError(f"cannot create a memory cgroup under {own}: {exc.strerror}") from exc
    try:
        yield folder
    finally:
        for _ in range(50):
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.02)  # its last process is still being reaped


@contextmanager
def forwarding(group: int, caught: list[int]) -> Iterator[None]:
    """Pass SIGINT and SIGTERM on to the command's process group, noting them."""
    def forward(signum: int, _frame: Any) -> None:
        caught.append(signum)
        try:
            os.killpg(group, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait(proc: subprocess.Popen[bytes], timeout: float | None) -> bool:
    """Wait for the command; past `timeout` send TERM, then KILL. True if it timed out."""
    try:
        proc.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        pass
    for sig, grace in ((signal.SIGTERM, KILL_AFTER), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
    return True


def reported_end(client: Client, run_id: str) -> bool:
    """Whether the command (through the client library) already ended its run."""
    try:
        conn = Connection(client.socket_path, timeout=2.0)
    except DaemonUnavailable:
        return False
    try:
        return State(conn.call(Get(run=run_id))["run"]["state"]).terminal
    except RunnerdError:
        return False
    finally:
        conn.close()


def _python_error(stderr_tail: bytes) -> tuple[str, str | None]:
    """The last exception line of a Python traceback on stderr, and the traceback."""
    text = stderr_tail.decode("utf-8", "replace")
    errors = [m.group(0).strip() for m in _EXCEPTION_LINE.finditer(text)]
    lines = text.strip().splitlines()
    last = errors[-1] if errors else (lines[-1] if lines else "")
    has_traceback = "Traceback (most recent call last)" in text
    return last[:500], text if has_traceback else None


def record_end(run: Run, rc: int, *, timed_out: bool, caught: list[int], timeout: float | None,
               stderr_tail: bytes, cgroup: Path | None, oom_before: int | None,
               limit: int | None = None) -> None:
    """End the run from the command's exit status (the command's own report wins)."""
    if caught:
        name = signal.Signals(caught[0]).name
        run.fail(FailReason.ABANDONED, f"runnerctl exec received {name}",
                 failure_class="KeyboardInterrupt" if caught[0] == signal.SIGINT else "Terminated")
    elif timed_out:
        run.fail(FailReason.TIMEOUT, f"command exceeded --timeout of {timeout:g} s",
                 failure_class="Timeout", exit_code=rc)
    elif rc == 0:
        run.succeed()
    elif rc > 0:
        last, traceback = _python_error(stderr_tail)
        run.fail(FailReason.CRASH, f"exit code {rc}" + (f": {last}" if last else ""),
                 failure_class="ExitCode", exit_code=rc, traceback=traceback)
    else:
        name = signal.Signals(-rc).name
        oom = name == "SIGKILL" and oom_before is not None and \
            (oom_kills(cgroup) or 0) > oom_before
        peak = cgroup_peak(cgroup) if limit else None
        killer = f" (OOM killer, peak {gib(peak)} of a {gib(limit)} limit)" if oom and peak \
            and limit else " (OOM killer)" if oom else ""
        run.fail(FailReason.CRASH, f"command killed by {name}{killer}",
                 failure_class=f"Signal:{name}", signal=name, exit_code=rc,
                 category_hint="oom" if oom else None)


def run_once(client: Client, launch: Launch, retry_of: str | None = None) -> Outcome:
    """Launch the command once, as a new attempt of its (experiment, variation)."""
    run = client.run(launch.experiment, launch.variation, params=launch.params,
                     run_dir=launch.run_dir, retry_of=retry_of, launch=asdict(launch),
                     heartbeat_interval=30.0)
    run.start().start_heartbeats()
    run.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with memory_cgroup(f"runnerd-{run.run_id}", launch.memory) as cgroup:
            return _run_in(client, run, launch, cgroup)
    except CgroupError as exc:
        run.stop_heartbeats().fail(FailReason.CRASH, f"--memory: {exc}",
                                   failure_class="CgroupError", exit_code=126)
        print(f"runnerctl: --memory: {exc}", file=sys.stderr)
        return Outcome(run, 126, False, False)


def _run_in(client: Client, run: Run, launch: Launch, cgroup: Path | None) -> Outcome:
    env = {**os.environ, **launch.env, RUN_ID_ENV: run.run_id}
    command = launch.command if cgroup is None else [
        "sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *launch.command]
    oom_before = oom_kills(cgroup or cgroup_dir("self"))
    try:
        proc = subprocess.Popen(command, cwd=launch.cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        run.stop_heartbeats().fail(FailReason.CRASH, f"cannot run {launch.command[0]}: {exc}",
                                   failure_class=type(exc).__name__, exit_code=127)
        return Outcome(run, 127, False, False)
    assert proc.stdout is not None and proc.stderr is not None
    tees = [Tee(proc.stdout, sys.stdout.buffer, run.run_dir / "stdout.log"),
            Tee(proc.stderr, sys.stderr.buffer, run.run_dir / "stderr.log")]
    for tee in tees:
        tee.start()
    caught: list[int] = []
    with forwarding(proc.pid, caught):
        timed_out = wait(proc, launch.timeout)
    for tee in tees:
        tee.join()
    run.stop_heartbeats()
    for name in ("stdout.log", "stderr.log"):
        run.artifact(run.run_dir / name)
    rc = proc.returncode
    if not reported_end(client, run.run_id):
        record_end(run, rc, timed_out=timed_out, caught=caught, timeout=launch.timeout,
                   stderr_tail=tees[1].tail, cgroup=cgroup or cgroup_dir("self"),
                   oom_before=oom_before, limit=launch.memory)
    run.flush()
    return Outcome(run, rc if rc >= 0 else 128 - rc, rc == 0 and not timed_out, bool(caught))


def run_with_retries(client: Client, launch: Launch, *, retries: int, backoff: float,
                     retry_on: str, retry_of: str | None = None) -> int:
    """Attempts until one succeeds, retries run out, or a failure is not worth retrying."""
    attempt = 0
    while True:
        attempt += 1
        outcome = run_once(client, launch, retry_of)
        if outcome.succeeded or outcome.interrupted or attempt > retries:
            return outcome.exit_code
        diagnosis = outcome.run.diagnosis or {}
        if retry_on == "retryable" and not diagnosis.get("retryable"):
            print(f"runnerctl: attempt {attempt} failed ({diagnosis.get('category', 'unknown')}),"
                  " not retryable", file=sys.stderr)
            return outcome.exit_code
        delay = backoff ** attempt * random.uniform(0.75, 1.25)
        print(f"runnerctl: attempt {attempt} failed ({diagnosis.get('category', 'unknown')});"
              f" retrying in {delay:.1f} s", file=sys.stderr)
        time.sleep(delay)
        retry_of = outcome.run.run_id
