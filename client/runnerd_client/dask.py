"""runnerd on Dask: each dispatch of a task to a worker is one run in that node's daemon.

    from runnerd_client.dask import RunnerdWorkerPlugin, RunnerdSchedulerPlugin
    client.register_plugin(RunnerdWorkerPlugin(experiment="my-sweep"))
    client.register_plugin(RunnerdSchedulerPlugin())

The worker plugin's hooks run on the worker's event loop, so they only enqueue: one
reporter thread per worker owns the daemon connection (and its spool), and a slow or
stopped daemon never slows a task. A worker process that dies (SIGKILL, OOM killer,
segfault) needs no plugin: the runs were created from that process, so the node's daemon
sees it die and fails them within a second. The scheduler plugin tells infrastructure
deaths from user errors (`oom`, `walltime`, `retired`, `killed_worker`) and labels the
runs. Importing this module imports `distributed` (the `runnerd[dask]` extra).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import KilledWorker, get_worker
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from distributed.utils import thread_state  # type: ignore[attr-defined]

from runnerd_client import paths
from runnerd_client.cells import variation as variation_of
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import (
    Create,
    ErrorCode,
    Fail,
    FailReason,
    Heartbeat,
    Label,
    RunnerdError,
    Start,
    Succeed,
    SweepGet,
)
from runnerd_client.run import Client, Run, backoff_delay, worth_retrying

log = logging.getLogger("runnerd_client.dask")
EXECUTING = ("executing", "long-running")
ANNOTATION = "runnerd"
PLUGIN_NAME = "runnerd"
TEARDOWN_FLUSH = 5.0
LEDGER_DELAY = 0.25  # a task still running this long is entered in the scheduler's ledger
SIGTERM_FLUSH = 2.0
RUN_TOPIC = "runnerd-run"


@dataclass
class TaskRun:
    """The run of one dispatch of a task on this worker."""

    run_id: str
    key: str
    run: Run
    seq: int = 0
    created: threading.Event = field(default_factory=threading.Event)
    refused: str | None = None
    ledger: asyncio.TimerHandle | None = None


class RunnerdWorkerPlugin(WorkerPlugin):
    """Records each task dispatch on this worker as a run in the node's daemon."""

    idempotent = True
    name = PLUGIN_NAME

    def __init__(self, experiment: str = "dask", socket_path: str | None = None,
                 heartbeat_interval: float = 60.0) -> None:
        self.experiment = experiment
        self.socket_path = socket_path
        self.heartbeat_interval = heartbeat_interval

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self.host, self.cwd = socket.gethostname(), os.getcwd()
        self.client = Client(self.socket_path)
        self.active: dict[str, TaskRun] = {}
        self.events: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._report, name="runnerd-dask-reporter",
                                       daemon=True)
        self.thread.start()
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """SIGTERM straight to the worker process (a job's walltime hits the whole process
        group): record its tasks as killed by it, labelled walltime, then die as asked."""
        recorded = threading.Event()
        at = time.time()
        tasks, self.active = list(self.active.values()), {}
        self.events.put(lambda: self._killed_by_sigterm(tasks, at, recorded))
        recorded.wait(SIGTERM_FLUSH)
        previous = self._previous_sigterm
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def _killed_by_sigterm(self, tasks: list[TaskRun], at: float,
                           recorded: threading.Event) -> None:
        futures = [self.client.emit(Fail(
            key=new_key(), run_id=task.run_id, reason=FailReason.CRASH,
            failure_class="Signal:SIGTERM", signal="SIGTERM", category_hint="walltime",
            message="the worker process got SIGTERM (a job's walltime, scancel)", at=at))
            for task in tasks]
        for future in futures:
            try:
                future.result(SIGTERM_FLUSH)
            except TimeoutError:
                break
        recorded.set()

    # --- hooks: on the worker's event loop, so they only enqueue ---

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        try:
            if finish in EXECUTING and start not in EXECUTING:
                self._begin(key)
            elif start in EXECUTING and finish not in EXECUTING:
                self._end(key, finish)
        except Exception:  # an exception here would be swallowed by Dask: log it
            log.exception("runnerd plugin: transition of %s not recorded", key)

    def teardown(self, worker: Any) -> None:
        """The worker is closing: its tasks still executing are abandoned, then we flush."""
        for name in list(self.active):
            self._end(name, "worker-closing")
        self.events.put(None)
        self.thread.join(TEARDOWN_FLUSH)
        self.client.drain(TEARDOWN_FLUSH, patient=False)

    def _begin(self, key: Any) -> None:
        ts = self.worker.state.tasks.get(key)
        spec = dict((ts.annotations or {}).get(ANNOTATION) or {}) if ts is not None else {}
        name = str(key)
        params = spec.get("params") or {}
        experiment = spec.get("experiment") or self.experiment
        variation = spec.get("variation") or (variation_of(params) if params else name)[:256]
        run_id = new_run_id()
        run = Run(self.client, run_id, experiment, variation, params=params,
                  run_dir=paths.default_run_dir(run_id),
                  heartbeat_interval=self.heartbeat_interval, limits={})
        task = TaskRun(run_id, name, run)
        self.active[name] = task
        tags = {"dask_key": name, "dispatch": getattr(ts, "run_id", None),
                "worker": self.worker.address, "host": self.host,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "sweep_id": spec.get("sweep_id"), "cell": spec.get("cell")}
        create = Create(key=new_key(), run_id=run_id, experiment=experiment,
                        variation=variation, params=params,
                        tags={k: v for k, v in tags.items() if v is not None},
                        cwd=self.cwd, run_dir=str(run.run_dir), host=self.host,
                        sweep_id=spec.get("sweep_id"), cell=spec.get("cell"),
                        claim_after=spec.get("claim_after"), resume=bool(spec.get("resume")),
                        at=time.time())
        self.events.put(lambda: self._create(task, create))
        entry = {"key": name, "run_id": run_id, "dispatch": tags["dispatch"],
                 "worker": self.worker.address}
        task.ledger = asyncio.get_running_loop().call_later(
            LEDGER_DELAY, self.worker.log_event, RUN_TOPIC, entry)

    def _end(self, key: Any, finish: str) -> None:
        task = self.active.pop(str(key), None)
        if task is None:
            return
        if task.ledger is not None:
            task.ledger.cancel()
        at = time.time()
        if finish == "memory":
            self.events.put(lambda: self._emit(Succeed(key=new_key(), run_id=task.run_id,
                                                       at=at)))
        elif finish == "error":
            ts = self.worker.state.tasks.get(key)
            self.events.put(lambda: self._emit(task_failure(task.run_id, ts, at)))
        else:
            message = f"Dask moved the task from executing to {finish}"
            self.events.put(lambda: self._emit(Fail(
                key=new_key(), run_id=task.run_id, reason=FailReason.ABANDONED,
                failure_class="TaskReleased", message=message, at=at)))

    # --- the reporter thread ---

    def _report(self) -> None:
        while True:
            try:
                event = self.events.get(timeout=self.heartbeat_interval)
            except queue.Empty:
                self._beat()
                continue
            if event is None:
                return
            try:
                event()
            except Exception:
                log.exception("runnerd plugin: event not recorded")

    def _create(self, task: TaskRun, create: Create) -> None:
        """Create and start the run; a claimed sweep cell waits for the daemon's verdict."""
        future = self.client.emit(create)
        if create.sweep_id is not None:
            reply = future.result()
            if not reply.get("ok") and (reply.get("error") or {}).get("code") == \
                    ErrorCode.CONFLICT:
                task.refused = reply["error"]["message"]
                task.created.set()
                return
            task.run.resumed_from = reply.get("resumed_from")
            task.run.resume_checkpoint = reply.get("resume_checkpoint")
            task.run.attempt = reply.get("attempt")
        self._emit(Start(key=new_key(), run_id=task.run_id, at=create.at))
        task.created.set()

    def _emit(self, req: Any) -> None:
        self.client.emit(req)

    def _beat(self) -> None:
        for task in list(self.active.values()):
            task.seq += 1
            self.client.emit(Heartbeat(run_id=task.run_id, seq=task.seq, at=time.time()))


def task_failure(run_id: str, ts: Any, at: float) -> Fail:
    """The `fail` of a task that raised: its real class, message and traceback (a failed
    command names its exit code or signal, as `runnerctl exec` does)."""
    failure_class, message = "TaskError", str(getattr(ts, "exception_text", "") or "")
    exc: BaseException | None = None
    try:
        exc = pickle.loads(ts.exception.data)
        failure_class, message = type(exc).__name__, str(exc)
    except Exception:  # the exception could not be unpickled here: keep its text
        pass
    frames = getattr(ts, "traceback_text", "") or ""
    traceback = f"Traceback (most recent call last):\n{frames}{failure_class}: {message}\n"
    if isinstance(exc, CommandFailed):
        return Fail(key=new_key(), run_id=run_id, reason=FailReason.CRASH,
                    failure_class=exc.failure_class, message=message, exit_code=exc.exit_code,
                    signal=exc.signal, traceback=exc.traceback, at=at)
    return Fail(key=new_key(), run_id=run_id, reason=FailReason.CRASH,
                failure_class=failure_class, message=message, traceback=traceback, at=at)


class CommandFailed(Exception):
    """A sweep cell's command that did not exit 0 on its worker."""

    def __init__(self, message: str, failure_class: str, exit_code: int,
                 signal: str | None = None, traceback: str | None = None) -> None:
        super().__init__(message)
        self.failure_class, self.exit_code, self.signal = failure_class, exit_code, signal
        self.traceback = traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (CommandFailed, (str(self), self.failure_class, self.exit_code, self.signal,
                                self.traceback))


@dataclass(frozen=True)
class CommandCell:
    """`runnerctl sweep run --dask`: a cell's command, run on the worker as its task. Its
    output goes to stdout.log and stderr.log in the run's folder (artifacts if not empty);
    a non-zero exit raises CommandFailed, which the plugin records like `exec` would."""

    command: tuple[str, ...]
    cwd: str
    timeout: float | None = None

    def __call__(self, **params: Any) -> int:
        import subprocess

        from runnerd_client.cells import substitute
        from runnerd_client.run import ACTIVE, RUN_ID_ENV

        run = ACTIVE.get()
        folder = run.run_dir if run is not None else Path(self.cwd)
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **({RUN_ID_ENV: run.run_id} if run is not None else {})}
        logs = [folder / "stdout.log", folder / "stderr.log"]
        with open(logs[0], "wb") as out, open(logs[1], "wb") as err:
            proc = subprocess.Popen(substitute(self.command, params), cwd=self.cwd, env=env,
                                    stdout=out, stderr=err, start_new_session=True)
            try:
                code = proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
        for log_path in logs:
            if run is not None and log_path.stat().st_size:
                run.artifact(log_path)
        if code != 0:
            raise _command_failure(code, logs[1].read_bytes()[-65536:])
        return code


def _command_failure(code: int, stderr_tail: bytes) -> CommandFailed:
    text = stderr_tail.decode("utf-8", "replace")
    lines = text.strip().splitlines()
    last = lines[-1][:500] if lines else ""
    traceback = text if "Traceback (most recent call last)" in text else None
    if code < 0:
        name = signal.Signals(-code).name
        return CommandFailed(f"command killed by {name}", f"Signal:{name}", 128 - code, name)
    return CommandFailed(f"exit code {code}" + (f": {last}" if last else ""), "ExitCode", code,
                         traceback=traceback)


def current_run(timeout: float = 30.0) -> Run | None:
    """Inside a task on a worker with the plugin: the run of this dispatch (for artifacts
    and checkpoints), once the daemon has it; None outside a task. A sweep cell claimed by
    another attempt raises RunnerdError(conflict)."""
    key = getattr(thread_state, "key", None)
    try:
        plugin = get_worker().plugins.get(PLUGIN_NAME)
    except ValueError:
        return None
    if not isinstance(plugin, RunnerdWorkerPlugin) or key is None:
        return None
    task = plugin.active.get(str(key))
    if task is None:
        return None
    task.created.wait(timeout)
    if task.refused is not None:
        raise RunnerdError(ErrorCode.CONFLICT, task.refused)
    return task.run


# --- the scheduler side ------------------------------------------------------------


@dataclass
class Attempt:
    """One dispatch of a task, as the scheduler's ledger keeps it."""

    key: str
    dispatch: Any
    run_id: str
    worker: str | None = None


LABELS = {
    "oom": "the nanny restarted the worker for exceeding its memory limit",
    "walltime": "the worker was closed by SIGTERM (a job's walltime or scancel)",
    "retired": "the worker was retired on purpose (scale down, retire_workers)",
    "killed_worker": "KilledWorker: Dask gave up on the task after its workers died",
}


class RunnerdSchedulerPlugin(SchedulerPlugin):
    """The ledger of attempts (key, dispatch, worker, run id), and the labels of the
    infrastructure deaths the workers cannot see themselves."""

    idempotent = True
    name = "runnerd-scheduler"

    def __init__(self, socket_path: str | None = None) -> None:
        self.socket_path = socket_path
        self.ledger: dict[str, Attempt] = {}
        self.reasons: dict[str, str] = {}  # worker address -> label of its coming death
        self.labels: list[tuple[str, str]] = []  # (run_id, label) sent, for inspection

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def log_event(self, topic: str | list[str], msg: Any) -> None:
        """Runs reported by the workers, and the events that explain a worker's death."""
        if not isinstance(msg, dict):
            return
        if topic == RUN_TOPIC:
            self.ledger[msg["key"]] = Attempt(msg["key"], msg.get("dispatch"), msg["run_id"],
                                              msg.get("worker"))
        elif topic == "worker-restart-memory":
            self.reasons[str(msg.get("worker"))] = "oom"
        elif msg.get("action") == "closing-worker" and isinstance(topic, str) and \
                "signal-15" in str(msg.get("reason", "")):
            self.reasons[topic] = "walltime"

    def remove_worker(self, scheduler: Any, worker: str, *, stimulus_id: str,
                      **kwargs: Any) -> None:
        """A worker is gone: label the runs of the tasks it was running, if we know why."""
        label = self.reasons.pop(worker, None)
        if label is None and stimulus_id.startswith("retire-workers"):
            label = "retired"  # its "retire-workers" event comes only after this call
        for attempt in [a for a in self.ledger.values() if a.worker == worker]:
            del self.ledger[attempt.key]
            if label is not None:
                self._label(attempt.run_id, label)

    def transition(self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str,
                   **kwargs: Any) -> None:
        """A finished task leaves the ledger (one whose worker died stays, for
        `remove_worker`); one Dask gave up on is labelled KilledWorker."""
        attempt = self.ledger.get(str(key))
        if attempt is None:
            return
        if finish == "erred" and _killed_worker(kwargs.get("exception")):
            self._label(attempt.run_id, "killed_worker")
        if finish in ("memory", "erred", "forgotten"):
            del self.ledger[str(key)]

    def _label(self, run_id: str, label: str) -> None:
        """Send the label from a thread: the scheduler's event loop must not wait on us."""
        self.labels.append((run_id, label))
        threading.Thread(target=send_label, args=(self.socket_path, run_id, label),
                         daemon=True).start()


def _killed_worker(exception: Any) -> bool:
    """Whether an `erred` transition is Dask giving up (its exception, pickled, is a
    KilledWorker) rather than the task's own error."""
    if not isinstance(exception, bytes):
        return False
    try:
        return isinstance(pickle.loads(exception), KilledWorker)
    except Exception:  # not ours to understand
        return False


def send_label(socket_path: str | Path | None, run_id: str, label: str) -> None:
    try:
        conn = Connection(socket_path, timeout=5.0)
    except RunnerdError as exc:
        log.warning("runnerd unreachable, run %s not labelled %s: %s", run_id, label, exc)
        return
    try:
        conn.call(Label(key=new_key(), run_id=run_id, category=label, note=LABELS[label]))
    except RunnerdError as exc:
        log.warning("run %s not labelled %s: %s", run_id, label, exc)
    finally:
        conn.close()


# --- sweeps on a cluster -----------------------------------------------------------


class Taken:
    """What a cell's task returns when another attempt holds its cell."""

    def __init__(self, message: str) -> None:
        self.message = message


def cell_task(fn: Callable[..., Any], params: dict[str, Any]) -> Any:
    """A sweep cell on a worker: its run (made by the plugin, claiming the cell) is
    `rd.current_run()` while `fn(**params)` runs."""
    from runnerd_client.run import ACTIVE

    try:
        run = current_run()
    except RunnerdError as exc:
        return Taken(exc.message)
    token = ACTIVE.set(run)
    try:
        return fn(**params)
    finally:
        ACTIVE.reset(token)


def run_on_dask(options: Any, planned: list[tuple[int, dict[str, Any], str | None]],
                fn: Callable[..., Any]) -> list[Any]:
    """`rd.sweep(..., executor=client)`: one Dask key per attempt of a cell, with Dask's own
    retries off (runnerd retries only what its diagnosis calls transient), and each
    future released as soon as its result is in, so a lost worker never makes Dask
    silently recompute a finished cell."""
    from dask.base import annotate
    from distributed import as_completed

    from runnerd_client.sweep import cell_states

    client = options.executor
    pending: dict[Any, tuple[int, dict[str, Any], int]] = {}

    def submit(index: int, params: dict[str, Any], after: str | None, attempt: int) -> Any:
        spec = {"experiment": options.experiment, "variation": variation_of(params),
                "params": params, "sweep_id": options.sweep_id, "cell": index,
                "claim_after": after, "resume": options.resume}
        with annotate(runnerd=spec):
            future = client.submit(cell_task, fn, params, pure=False, retries=0,
                                   key=f"runnerd-{options.sweep_id}-{index}-{attempt}")
        pending[future] = (index, params, attempt)
        return future

    results = as_completed([submit(i, p, a, 1)  # type: ignore[no-untyped-call]
                            for i, p, a in planned])
    outcomes, stopped = [], False
    for future in results:
        index, params, attempt = pending.pop(future)
        outcome = _outcome(future, index, params, attempt)
        future.release()
        if outcome.state == "cancelled":
            continue
        if outcome.state == "failed" and attempt <= options.retries and not stopped:
            cell = cell_states(options.sweep_id, index, settled=True)
            if worth_retrying(cell.get("failure"), options.retry_on):
                time.sleep(backoff_delay(options.backoff, attempt))
                results.add(  # type: ignore[no-untyped-call]
                    submit(index, params, cell.get("run_id"), attempt + 1))
                continue
        outcomes.append(outcome)
        if outcome.state == "failed" and options.policy == "fail_fast" and not stopped:
            stopped = True
            client.cancel(list(pending))
    if stopped:
        settle(options.sweep_id)
    return outcomes


def settle(sweep_id: str, timeout: float = 15.0) -> None:
    """Wait (a while) for the cells fail_fast cancelled to be recorded as abandoned: their
    workers report it on their own time, and the sweep ends only when none is running."""
    from runnerd_client.sweep import daemon_connection

    deadline = time.monotonic() + timeout
    with daemon_connection() as conn:
        while time.monotonic() < deadline:
            summary = conn.call(SweepGet(sweep=sweep_id))["sweep"]["cells_summary"]
            if not summary["running"]:
                return
            time.sleep(0.05)


def _outcome(future: Any, index: int, params: dict[str, Any], attempts: int) -> Any:
    from runnerd_client.sweep import CellOutcome

    if future.status == "cancelled":
        return CellOutcome(index, params, "cancelled", attempts=attempts)
    if future.status == "error":
        exc = future.exception()
        name = getattr(exc, "failure_class", type(exc).__name__)
        return CellOutcome(index, params, "failed", attempts=attempts, error=f"{name}: {exc}",
                           exception=exc)
    value = future.result()
    if isinstance(value, Taken):
        return CellOutcome(index, params, "taken", attempts=attempts - 1, error=value.message)
    return CellOutcome(index, params, "succeeded", attempts=attempts, value=value)
