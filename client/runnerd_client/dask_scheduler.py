"""The scheduler side of runnerd on Dask: a ledger of dispatches (key, worker, run id),
and labels for the infrastructure deaths the workers cannot see themselves (`oom`,
`walltime`, `retired`, `killed_worker`).

    client.register_plugin(RunnerdSchedulerPlugin())
"""

from __future__ import annotations

import logging
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import KilledWorker
from distributed.diagnostics.plugin import SchedulerPlugin

from runnerd_client.connection import Connection
from runnerd_client.dask_labels import NODE_TOPIC, NodeLabels, local_node
from runnerd_client.ids import new_key
from runnerd_client.protocol import Label, RunnerdError

log = logging.getLogger("runnerd_client.dask")
RUN_TOPIC = "runnerd-run"  # the event a worker logs for each task's run
ANNOTATION = "runnerd"  # the tasks' annotations runnerd reads (dask.annotate(runnerd=...))


@dataclass
class Dispatch:
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
        self.ledger: dict[str, Dispatch] = {}
        self.reasons: dict[str, str] = {}  # worker address -> label of its coming death
        self.labels: list[tuple[str, str]] = []  # (run_id, label) sent, for inspection

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.node_labels = NodeLabels(local_node(self.socket_path))  # to where runs lived

    async def close(self) -> None:
        await self.node_labels.close()

    def log_event(self, topic: str | list[str], msg: Any) -> None:
        """Runs reported by the workers, and the events that explain a worker's death."""
        if not isinstance(msg, dict):
            return
        if topic == RUN_TOPIC:
            self.ledger[msg["key"]] = Dispatch(
                msg["key"], msg.get("dispatch"), msg["run_id"], msg.get("worker")
            )
        elif topic == NODE_TOPIC:
            self.node_labels.seen(self.scheduler, msg)
        elif topic == "worker-restart-memory":
            self.reasons[str(msg.get("worker"))] = "oom"
        elif (
            msg.get("action") == "closing-worker"
            and isinstance(topic, str)
            and "signal-15" in str(msg.get("reason", ""))
        ):
            self.reasons[topic] = "walltime"

    def remove_worker(
        self, scheduler: Any, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        """A worker is gone: label the runs of the tasks it was running, if we know why."""
        label = self.reasons.pop(worker, None)
        if label is None and stimulus_id.startswith("retire-workers"):
            label = "retired"  # its "retire-workers" event comes only after this call
        for attempt in [a for a in self.ledger.values() if a.worker == worker]:
            del self.ledger[attempt.key]
            if label is not None:
                self._label(attempt.run_id, label, worker=worker)

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        """A finished task leaves the ledger (one whose worker died stays, for
        `remove_worker`); one Dask gave up on is labelled KilledWorker; one released
        because its worker is gone is dispatched again as a retry of the dead dispatch."""
        attempt = self.ledger.get(str(key))
        if attempt is None:
            return
        if (
            start == "processing"
            and finish == "released"
            and attempt.worker not in self.scheduler.workers
        ):
            self._follow(key, attempt.run_id)
        if finish == "erred" and _killed_worker(kwargs.get("exception")):
            cause = self.reasons.get(str(attempt.worker))  # its worker is being removed
            self._label(
                attempt.run_id,
                "killed_worker",
                LABELS["killed_worker"] + (f"; its last worker: {LABELS[cause]}" if cause else ""),
                worker=attempt.worker,
            )
        if finish in ("memory", "erred", "forgotten"):
            del self.ledger[str(key)]

    def _follow(self, key: Any, run_id: str) -> None:
        """The task's next dispatch follows the run of the one whose worker died: its
        worker's plugin links it (`retry_of`), through the task's annotations, which each
        dispatch carries to its worker. (The scheduler removes the worker before it runs
        the task again, and calls this in between.)"""
        ts = self.scheduler.tasks.get(key)
        if ts is None:
            return
        annotations = dict(ts.annotations or {})
        annotations[ANNOTATION] = {**(annotations.get(ANNOTATION) or {}), "retry_of": run_id}
        ts.annotations = annotations

    def _label(
        self, run_id: str, label: str, note: str | None = None, worker: str | None = None
    ) -> None:
        """Label the run in the daemon of its worker's node, through Dask; where that node
        is unknown, in the daemon beside the scheduler, from a thread (the scheduler's
        event loop must not wait on us)."""
        self.labels.append((run_id, label))
        if self.node_labels.send(self.scheduler, worker, (run_id, label, note or LABELS[label])):
            return
        threading.Thread(
            target=send_label, args=(self.socket_path, run_id, label, note), daemon=True
        ).start()


def held_labels(dask_scheduler: Any) -> list[dict[str, str | None]]:
    """On the scheduler (`Client.run_on_scheduler`): the labels held for runs whose node has
    no live worker, each with its node, for runnerctl to join to what it shows until a
    worker of that node is back and delivers them."""
    plugin = dask_scheduler.plugins.get(RunnerdSchedulerPlugin.name)
    node_labels = getattr(plugin, "node_labels", None)
    if node_labels is None:
        return []
    return [
        {"run_id": run_id, "category": label, "note": note, "host": host, "socket": path}
        for (host, path), labels in node_labels.held.items()
        for run_id, label, note in labels
    ]


def _killed_worker(exception: Any) -> bool:
    """Whether an `erred` transition is Dask giving up (its exception, pickled, is a
    KilledWorker) rather than the task's own error."""
    if not isinstance(exception, bytes):
        return False
    try:
        return isinstance(pickle.loads(exception), KilledWorker)
    except Exception:  # not ours to understand
        return False


def send_label(
    socket_path: str | Path | None, run_id: str, label: str, note: str | None = None
) -> None:
    try:
        conn = Connection(socket_path, timeout=5.0)
    except RunnerdError as exc:
        log.warning("runnerd unreachable, run %s not labelled %s: %s", run_id, label, exc)
        return
    try:
        conn.call(Label(key=new_key(), run_id=run_id, category=label, note=note or LABELS[label]))
    except RunnerdError as exc:
        log.warning("run %s not labelled %s: %s", run_id, label, exc)
    finally:
        conn.close()
