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
from typing import Any

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.utils import thread_state  # type: ignore[attr-defined]

from runnerd_client import paths
from runnerd_client.cells import variation as variation_of
from runnerd_client.client import Client
from runnerd_client.dask_commands import CommandFailed, stop_command
from runnerd_client.dask_labels import announce
from runnerd_client.dask_scheduler import ANNOTATION, RUN_TOPIC, RunnerdSchedulerPlugin
from runnerd_client.errors import RunRefused
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import (
    Create,
    ErrorCode,
    Fail,
    FailReason,
    Heartbeat,
    Request,
    Start,
    Succeed,
)
from runnerd_client.run import Run

log = logging.getLogger("runnerd_client.dask")
EXECUTING = ("executing", "long-running")
PLUGIN_NAME = "runnerd"
TEARDOWN_FLUSH = 5.0
LEDGER_DELAY = 0.25  # a task still running this long is entered in the scheduler's ledger
SIGTERM_FLUSH = 2.0
__all__ = ["RunnerdSchedulerPlugin", "RunnerdWorkerPlugin", "current_run"]


@dataclass
class TaskRun:
    """The run of one dispatch of a task on this worker."""

    run_id: str
    key: str
    run: Run
    seq: int = 0
    created: threading.Event = field(default_factory=threading.Event)
    refused: RunRefused | None = None
    ledger: asyncio.TimerHandle | None = None


class RunnerdWorkerPlugin(WorkerPlugin):
    """Records each task dispatch on this worker as a run in the node's daemon."""

    idempotent = True
    name = PLUGIN_NAME

    def __init__(
        self,
        experiment: str = "dask",
        socket_path: str | None = None,
        heartbeat_interval: float = 60.0,
    ) -> None:
        self.experiment = experiment
        self.socket_path = socket_path
        self.heartbeat_interval = heartbeat_interval

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self.host, self.cwd = socket.gethostname(), os.getcwd()
        self.client = Client(self.socket_path)
        self.active: dict[str, TaskRun] = {}
        self.events: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._report, name="runnerd-dask-reporter", daemon=True
        )
        self.thread.start()
        announce(worker, self.socket_path)  # so that labels find this node's daemon
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

    def _killed_by_sigterm(
        self, tasks: list[TaskRun], at: float, recorded: threading.Event
    ) -> None:
        futures = [
            self.client.emit(
                Fail(
                    key=new_key(),
                    run_id=task.run_id,
                    reason=FailReason.CRASH,
                    failure_class="Signal:SIGTERM",
                    signal="SIGTERM",
                    category_hint="walltime",
                    message="the worker process got SIGTERM (a job's walltime, scancel)",
                    at=at,
                )
            )
            for task in tasks
        ]
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
        run = Run(
            self.client,
            run_id,
            experiment,
            variation,
            params=params,
            run_dir=paths.default_run_dir(run_id),
            heartbeat_interval=self.heartbeat_interval,
            limits={},
        )
        task = TaskRun(run_id, name, run)
        self.active[name] = task
        tags = {
            "dask_key": name,
            "dispatch": getattr(ts, "run_id", None),
            "worker": self.worker.address,
            "host": self.host,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "sweep_id": spec.get("sweep_id"),
            "cell": spec.get("cell"),
        }
        create = Create(
            key=new_key(),
            run_id=run_id,
            experiment=experiment,
            variation=variation,
            params=params,
            tags={k: v for k, v in tags.items() if v is not None},
            cwd=self.cwd,
            run_dir=str(run.run_dir),
            host=self.host,
            sweep_id=spec.get("sweep_id"),
            cell=spec.get("cell"),
            claim_after=spec.get("claim_after"),
            retry_of=spec.get("retry_of"),
            claim_token=name,
            resume=bool(spec.get("resume")),
            at=time.time(),
        )
        self.events.put(lambda: self._create(task, create))
        entry = {
            "key": name,
            "run_id": run_id,
            "dispatch": tags["dispatch"],
            "worker": self.worker.address,
        }
        task.ledger = asyncio.get_running_loop().call_later(
            LEDGER_DELAY, self.worker.log_event, RUN_TOPIC, entry
        )

    def _end(self, key: Any, finish: str) -> None:
        task = self.active.pop(str(key), None)
        if task is None:
            return
        if task.ledger is not None:
            task.ledger.cancel()
        at = time.time()
        if finish == "memory":
            self.events.put(lambda: self._emit(Succeed(key=new_key(), run_id=task.run_id, at=at)))
        elif finish == "error":
            ts = self.worker.state.tasks.get(key)
            self.events.put(lambda: self._emit(task_failure(task.run_id, ts, at)))
        else:
            stop_command(task.run_id)  # a sweep cell's command: stopped with its task
            message = released(finish)
            self.events.put(
                lambda: self._emit(
                    Fail(
                        key=new_key(),
                        run_id=task.run_id,
                        reason=FailReason.ABANDONED,
                        failure_class="TaskReleased",
                        message=message,
                        at=at,
                    )
                )
            )

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
        """Create and start the run; a claimed sweep cell waits for the daemon's verdict.
        A run that cannot be made (a wrong annotation, a refusal) is said on the worker's
        log, and `current_run()` in its task raises why."""
        try:
            future = self.client.emit(create)
        except (TypeError, ValueError) as exc:  # the task's annotation, checked before sent
            self._refuse(task, RunRefused(ErrorCode.BAD_REQUEST, str(exc), task.run_id))
            return
        if create.sweep_id is not None:
            reply = future.result()
            if not reply.get("ok") and (reply.get("error") or {}).get("code") == ErrorCode.CONFLICT:
                task.refused = RunRefused(
                    ErrorCode.CONFLICT, reply["error"]["message"], task.run_id
                )
                task.created.set()
                return
            task.run.resumed_from = reply.get("resumed_from")
            task.run.resume_checkpoint = reply.get("resume_checkpoint")
            task.run.attempt = reply.get("attempt")
        else:
            future.add_done_callback(lambda done: self._answered(task, done.result()))
        self._emit(Start(key=new_key(), run_id=task.run_id, at=create.at))
        task.created.set()

    def _answered(self, task: TaskRun, reply: dict[str, Any]) -> None:
        error = reply.get("error") or {}
        if not reply.get("ok") and error.get("code") != ErrorCode.UNAVAILABLE:
            self._refuse(
                task, RunRefused(str(error.get("code")), str(error.get("message")), task.run_id)
            )

    def _refuse(self, task: TaskRun, refusal: RunRefused) -> None:
        log.warning("runnerd plugin: task %s runs untracked: %s", task.key, refusal)
        task.refused = refusal
        task.created.set()

    def _emit(self, req: Request) -> None:
        self.client.emit(req)

    def _beat(self) -> None:
        for task in list(self.active.values()):
            task.seq += 1
            self.client.emit(Heartbeat(run_id=task.run_id, seq=task.seq, at=time.time()))


def released(finish: str) -> str:
    """Why a task stopped executing, as far as its worker can tell: Dask does not say why
    a client cancelled it (a caller's own timeout and any other reason look the same)."""
    if finish == "worker-closing":
        return "its worker closed while the task was executing"
    return (
        f"Dask moved the task from executing to {finish}: a client cancelled it"
        " (future.cancel(), after its own result(timeout=...) say) or no longer wants"
        " its result; Dask does not tell the worker which"
    )


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
        return Fail(
            key=new_key(),
            run_id=run_id,
            reason=FailReason.CRASH,
            failure_class=exc.failure_class,
            message=message,
            exit_code=exc.exit_code,
            signal=exc.signal,
            traceback=exc.traceback,
            at=at,
        )
    return Fail(
        key=new_key(),
        run_id=run_id,
        reason=FailReason.CRASH,
        failure_class=failure_class,
        message=message,
        traceback=traceback,
        at=at,
    )


def current_run(timeout: float = 30.0) -> Run | None:
    """Inside a task on a worker with the plugin: the run of this dispatch (for artifacts
    and checkpoints), once the daemon has it; None outside a task. A run that could not be
    made raises RunRefused: a sweep cell claimed by another attempt (`conflict`), a wrong
    annotation or a create the daemon refused (`bad_request`)."""
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
        raise task.refused
    return task.run
