"""Start-up recovery: no run is left active with its processes gone, and timers are re-armed."""

from __future__ import annotations

import logging
import time

from runnerd.processes import ProcessWatcher, is_alive
from runnerd.registry import Registry, Store
from runnerd.states import Event, end_with_failure, failure_record
from runnerd.watchdog import Watchdog, next_due
from runnerd_client.protocol import FailReason

log = logging.getLogger(__name__)
SOURCE = "reconciler"

LivePid = tuple[str, int, int | None]


def reconcile(store: Store, now: float) -> list[LivePid]:
    """Fail active runs whose every attached process died while the daemon was down.

    Returns the (run_id, pid, start time) of processes still alive, to watch again.
    """
    live_pids: list[LivePid] = []
    for row in store.active_rows():
        run_id = row["run_id"]
        records = store.pid_records(run_id)
        live = [(pid, start) for pid, start in records if is_alive(pid, start)]
        if records and not live:
            pids = ", ".join(str(pid) for pid, _ in records)
            record = failure_record(
                "ProcessExited", f"process {pids} exited while runnerd was down",
                FailReason.CRASH, now)
            end_with_failure(store, row, Event.PROCESS_EXITED, record, SOURCE)
            continue
        for pid, start in records:
            if (pid, start) not in live:
                store.remove_pid(run_id, pid)
        live_pids += [(run_id, pid, start) for pid, start in live]
    return live_pids


async def recover(registry: Registry, watchdog: Watchdog, watcher: ProcessWatcher) -> None:
    """Reconcile the registry, watch the live processes again and re-arm every timer."""
    started = time.monotonic()
    live = await registry.submit(lambda store: reconcile(store, time.time()))
    for run_id, pid, start in live:
        watcher.watch(run_id, pid, start)
    rows = await registry.read(lambda store: store.active_rows())
    for row in rows:
        watchdog.arm(row["run_id"], next_due(row))
    log.info("recovered %d active runs (%d live processes) in %.3f s",
             len(rows), len(live), time.monotonic() - started)
