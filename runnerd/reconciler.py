"""Start-up recovery: no run is left active with its processes gone, and timers are re-armed."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from runnerd.handlers import Context
from runnerd.processes import ProcessWatcher, exit_failure, is_alive
from runnerd.registry import RunRow, Store
from runnerd.spool_replay import replay_orphan_spools
from runnerd.states import Event, end_with_failure, failure_record
from runnerd.watchdog import Watchdog, next_due
from runnerd_client import procinfo
from runnerd_client.protocol import FailReason

log = logging.getLogger(__name__)
SOURCE = "reconciler"

LivePid = tuple[str, int, int | None]


@dataclass
class Reconciled:
    """What start-up found: processes still alive to watch again (run_id, pid, start
    time), and how many runs it ended, interrupted or crashed."""

    live: list[LivePid] = field(default_factory=list)
    interrupted: int = 0
    crashed: int = 0

    def said(self) -> str:
        """What it did, for the start-up log line: `marked 4 runs interrupted`."""
        ended = [
            f"{n} run{'s' * (n != 1)} {what}"
            for n, what in (
                (self.interrupted, "interrupted"),
                (self.crashed, "crashed while runnerd was down"),
            )
            if n
        ]
        return "marked " + " and ".join(ended) if ended else "ended no run"


def reconcile(store: Store, now: float) -> Reconciled:
    """Fail active runs whose every attached process died while the daemon was down; the
    processes still alive, to watch again."""
    found = Reconciled()
    for row in store.runs.active():
        run_id = row.run_id
        records = store.attachments.pid_records(run_id)
        live = [(pid, start) for pid, start in records if is_alive(pid, start)]
        if records and not live:
            if _fail_gone(store, row, now):
                found.interrupted += 1
            else:
                found.crashed += 1
            continue
        for pid, start in records:
            if (pid, start) not in live:
                store.attachments.remove_pid(run_id, pid)
        found.live += [(run_id, pid, start) for pid, start in live]
    return found


def _fail_gone(store: Store, row: RunRow, now: float) -> bool:
    """A run whose processes are gone at start-up. If they were attached in this boot they
    died on their own while runnerd was down: crashed (crash.log says how, if it can).
    Otherwise the machine went down under them: interrupted (and worth resuming); True."""
    boots = store.attachments.pid_boots(row.run_id)
    pids = ", ".join(str(pid) for pid, _ in boots)
    record = exit_failure(row.run_dir, pids, "exited while runnerd was down", now)
    current = procinfo.boot_id()
    if (
        record.failure_class != "ProcessExited"
        or current is not None
        and all(boot == current for _, boot in boots)
    ):
        end_with_failure(store, row, Event.PROCESS_EXITED, record, SOURCE)
        return False
    record = failure_record(
        "Interrupted",
        f"process {pids} was running when the machine went down"
        " (it was started before the last boot)",
        FailReason.ABANDONED,
        now,
    )
    end_with_failure(store, row, Event.INTERRUPTED, record, SOURCE)
    return True


async def recover(ctx: Context, watchdog: Watchdog, watcher: ProcessWatcher) -> None:
    """Replay orphan spools, reconcile, watch live processes again and re-arm every timer."""
    started = time.monotonic()
    registry = ctx.registry
    replayed = await replay_orphan_spools(ctx)
    found = await registry.submit(lambda store: reconcile(store, time.time()))
    for run_id, pid, start in found.live:
        watcher.watch(run_id, pid, start)
    rows = await registry.read(lambda store: store.runs.active())
    for row in rows:
        watchdog.arm(row.run_id, next_due(row))
    log.info(
        "start-up: replayed %d spooled events, %s; recovered %d active runs"
        " (%d live processes) in %.3f s",
        replayed,
        found.said(),
        len(rows),
        len(found.live),
        time.monotonic() - started,
    )
