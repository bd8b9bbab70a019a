"""The hook runner: for each `[[hooks]]` table, a worker that reads the event log after
its cursor and delivers the events it wants to its command.

Events are delivered one run at a time and in order (a queue and a task per run), runs
side by side, at most `hook_concurrency` calls at once over all hooks. A call that fails
is retried with backoff until it succeeds, holding back only its own run. The event loop
only schedules: reads go to the registry's reader thread, calls and cursor writes to
worker threads. At most WINDOW events per hook wait in memory; the rest stay in the log.
A stream hook (stream.py) gets its events in one process, one at a time.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import datetime
from fnmatch import fnmatchcase
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup

from runnerd import sweeps
from runnerd.config import Config, Hook
from runnerd.hooks import cursor
from runnerd.hooks.call import HookCall, Outcome
from runnerd.hooks.stream import HookStream, close_all, stream_of
from runnerd.registry import Registry, Store, iso
from runnerd_client.protocol import RunnerdError
from runnerd_client.replies import as_map
from runnerd_client.retries import backoff_delay

log = logging.getLogger(__name__)
Event = dict[str, Any]

WINDOW = 1000  # events read from the log and not yet delivered, per hook
PAGE = 500
MAX_RETRY_DELAY = 300.0
SAVE_EVERY = 30.0  # seconds: a cursor moved only past unwanted events is saved this often
SAVE_GAP = 0.05  # seconds between saves: a crash (not a stop) may deliver this much again
RESTART_DELAY = 5.0
STREAM_CLOSE_WAIT = 1.0  # seconds stream hooks get to exit once their stdin is closed
ENVELOPE = ("event", "seq", "run_id", "experiment", "variation", "tags", "sweep_id", "at")


def event_name(event: Event) -> str:
    """What `events` patterns match: a state change by its new state, others by kind."""
    return str(event["to"] if event["event"] == "transition" else event["event"])


def wanted(hook: Hook, event: Event) -> bool:
    """The hook's event patterns, experiment pattern and tags all match the event."""
    name = event_name(event)
    if not any(fnmatchcase(name, pattern) for pattern in hook.events):
        return False
    if hook.experiment is not None and not fnmatchcase(event["experiment"] or "", hook.experiment):
        return False
    tags = event.get("tags") or {}
    return all(key in tags and tags[key] == value for key, value in hook.tags.items())


def hook_event(event: Event) -> Event:
    """The event as a hook gets it: its envelope, its name, `at` in unix time, and the
    kind's own fields under `data`."""
    return {
        "seq": event["seq"],
        "kind": event["event"],
        "name": event_name(event),
        "run_id": event["run_id"],
        "experiment": event["experiment"],
        "variation": event.get("variation"),
        "tags": event.get("tags") or {},
        "sweep_id": event.get("sweep_id"),
        "at": datetime.fromisoformat(event["at"]).timestamp(),
        "data": {k: v for k, v in event.items() if k not in ENVELOPE},
    }


def _subject(
    store: Store, run_id: str | None, sweep_id: str | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The run as `show --json` prints it (or the sweep of a sweep's event); None if gone."""
    if run_id:
        return (as_map(store.views.run_details(run_id)) if store.runs.get(run_id) else None), None
    row = store.sweeps.get(sweep_id) if sweep_id else None
    return None, (as_map(sweeps.sweep_object(store, row)) if row else None)


class HookRunner:
    """Every configured hook's worker, and the calls they share a limit on."""

    def __init__(self, cfg: Config, registry: Registry) -> None:
        self.registry = registry
        self.socket = str(cfg.socket)
        self.folder = cfg.db.parent / "hooks"
        self.slots = anyio.CapacityLimiter(cfg.hook_concurrency)  # calls, with their reads
        self.threads = anyio.CapacityLimiter(cfg.hook_concurrency)  # never waited for
        self.workers = [HookWorker(hook, self) for hook in cfg.hooks]
        self.streams = {h.name: stream_of(h, self.socket) for h in cfg.hooks if h.mode == "stream"}
        self.turns = {name: anyio.Lock() for name in self.streams}  # one event at a time

    def on_commit(self, result: Any) -> None:
        """Hand a batch's logged events to the workers (called on the loop)."""
        if result.effects.events:
            for worker in self.workers:
                worker.offer(result.effects.events)

    async def run(self) -> None:
        """Serve every hook (stream hooks' processes started at once, so their imports are
        done before the first event) until cancelled; then stop the stream processes."""
        try:
            async with anyio.create_task_group() as tg:
                for stream in self.streams.values():
                    tg.start_soon(
                        partial(anyio.to_thread.run_sync, stream.warm, abandon_on_cancel=True)
                    )
                for worker in self.workers:
                    tg.start_soon(worker.run)
        finally:
            with anyio.CancelScope(shield=True):
                streams = list(self.streams.values())
                await anyio.to_thread.run_sync(close_all, streams, STREAM_CLOSE_WAIT)

    def status(self, last_seq: int) -> list[dict[str, Any]]:
        return [worker.status(last_seq) for worker in self.workers]

    async def call(self, hook: Hook, event: Event) -> Outcome:
        """One call of the hook's command with the event and its run (read when the call
        gets its turn), in a worker thread; killed if the daemon stops meanwhile. A stream
        hook's events take turns, for its one process takes one at a time."""
        stream = self.streams.get(hook.name)
        turn: AbstractAsyncContextManager[Any] = (
            self.turns[hook.name] if stream is not None else nullcontext()
        )
        async with turn, self.slots:
            run, sweep = await self.registry.read(
                partial(_subject, run_id=event["run_id"], sweep_id=event["sweep_id"])
            )
            body: dict[str, Any] = {"hook": hook.name, "event": event, "run": run}
            if sweep is not None:
                body["sweep"] = sweep
            if stream is not None:
                return await self._send(stream, body, event["seq"])
            state = (run or {}).get("state") or (sweep or {}).get("status") or ""
            env = {
                "RUNNERD_HOOK": hook.name,
                "RUNNERD_EVENT": event["name"],
                "RUNNERD_RUN_ID": event["run_id"] or "",
                "RUNNERD_STATE": state,
                "RUNNERD_EXPERIMENT": event["experiment"] or "",
                "RUNNERD_SOCKET": self.socket,
            }
            call = HookCall(hook.command, body, env, hook.timeout)
            try:
                return await anyio.to_thread.run_sync(
                    call.run, limiter=self.threads, abandon_on_cancel=True
                )
            finally:
                call.kill()  # a no-op once it ended; at shutdown it stops the command

    async def _send(self, stream: HookStream, body: dict[str, Any], seq: int) -> Outcome:
        """One event to a stream hook's process, in a worker thread; the process is killed
        if the daemon stops meanwhile (its next one gets the event again)."""
        try:
            return await anyio.to_thread.run_sync(
                stream.deliver, body, seq, limiter=self.threads, abandon_on_cancel=True
            )
        except anyio.get_cancelled_exc_class():
            stream.kill()
            raise


class HookWorker:
    """One hook: its cursor, the events waiting for it (a queue per run), its last result."""

    def __init__(self, hook: Hook, runner: HookRunner) -> None:
        self.hook, self.runner = hook, runner
        self.wake = anyio.Event()
        self._reset(cursor.Cursor())

    def _reset(self, saved: cursor.Cursor) -> None:
        self.cursor = self.read_to = saved.seq
        self.done_above = set(saved.delivered)  # delivered, after the cursor
        self.last = saved.last
        self.waiting: set[int] = set()
        self.queues: dict[str, deque[Event]] = {}
        self.retrying: set[str] = set()
        self.calls = self.delivered = self.failed = 0
        self.changed = anyio.Event()
        self.version = self.saved = 0  # of what the cursor file should hold / holds
        self.tasks: TaskGroup | None = None  # while serving

    async def run(self) -> None:
        """Serve the hook; a fault in it is logged and the hook restarted from its cursor,
        never the daemon's end."""
        while True:
            try:
                await self._serve()
            except Exception:
                log.exception(
                    "hook %s failed; restarting it in %g s", self.hook.name, RESTART_DELAY
                )
            await anyio.sleep(RESTART_DELAY)

    async def _serve(self) -> None:
        await self._load()
        try:
            async with anyio.create_task_group() as self.tasks:
                self.tasks.start_soon(self._keep_saved)
                await self._read_log()
        finally:
            self.tasks = None
            with anyio.CancelScope(shield=True):
                await self._save()

    async def _load(self) -> None:
        folder, name = self.runner.folder, self.hook.name
        saved = await anyio.to_thread.run_sync(cursor.load, folder, name)
        last_seq = await self.runner.registry.read(lambda store: store.events.last_seq())
        if saved is None:  # a new hook: it gets what happens from now on
            saved = cursor.Cursor(last_seq)
        elif saved.seq > last_seq:
            log.warning(
                "hook %s: its cursor (%d) is past the end of the log (%d), which was "
                "pruned or restored; it goes on from there",
                name,
                saved.seq,
                last_seq,
            )
            saved = cursor.Cursor(last_seq, last=saved.last)
        self._reset(saved)

    def offer(self, events: list[Event]) -> None:
        """A committed batch's events: taken at once when they follow the last event read
        and there is room (no read of the log), else read from the log later."""
        if (
            self.tasks is not None
            and events[0]["seq"] == self.read_to + 1
            and len(self.waiting) < WINDOW
        ):
            self._take(events)
        else:
            self.wake.set()

    async def _read_log(self) -> None:
        """Read the log after what was read (catching up, or after the window was full)."""
        while True:
            if len(self.waiting) >= WINDOW:
                await self._sleep()
                continue
            page = await self.runner.registry.read(
                lambda store: store.events.after(self.read_to, None, None, None, PAGE)
            )
            self._take(page)
            if len(page) < PAGE:
                await self._sleep()

    async def _sleep(self) -> None:
        await self.wake.wait()
        self.wake = anyio.Event()

    def _take(self, page: list[Event]) -> None:
        assert self.tasks is not None
        for event in page:
            seq = event["seq"]
            if seq <= self.read_to:  # offered while this page was being read
                continue
            self.read_to = seq
            if seq in self.done_above or not wanted(self.hook, event):
                continue
            self.waiting.add(seq)
            key = event["run_id"] or f"sweep:{event['sweep_id']}"
            queue = self.queues.get(key)
            if queue is None:
                queue = self.queues[key] = deque()
                self.tasks.start_soon(self._drain, key, queue)
            queue.append(event)
        self._advance()

    async def _drain(self, key: str, queue: deque[Event]) -> None:
        """Deliver one run's events in order, each until it is delivered."""
        while queue:
            event = queue[0]
            await self._deliver(key, hook_event(event))
            queue.popleft()
            self.waiting.discard(event["seq"])
            self.done_above.add(event["seq"])
            self.version += 1
            self._advance()
            self.changed.set()
            if len(self.waiting) == WINDOW - 1:  # room again: read on
                self.wake.set()
        del self.queues[key]

    async def _deliver(self, key: str, event: Event) -> None:
        failures = 0
        while True:
            try:
                outcome = await self.runner.call(self.hook, event)
            except RunnerdError as exc:  # the registry could not be read: try again later
                outcome = Outcome(False, None, str(exc), 0.0)
            self._note(event, outcome)
            if outcome.ok:
                self.retrying.discard(key)
                return
            failures += 1
            delay = min(backoff_delay(2.0, failures - 1), MAX_RETRY_DELAY)
            log.warning(
                "hook %s: event %d (%s of %s) not delivered, attempt %d: %s; retrying in %.1f s",
                self.hook.name,
                event["seq"],
                event["name"],
                key,
                failures,
                outcome.error,
                delay,
            )
            self.retrying.add(key)
            await anyio.sleep(delay)

    def _note(self, event: Event, outcome: Outcome) -> None:
        self.calls += 1
        self.version += 1
        self.delivered += outcome.ok
        self.failed += not outcome.ok
        self.last = {
            "at": iso(time.time()),
            "seq": event["seq"],
            "event": event["name"],
            "run_id": event["run_id"],
            "ok": outcome.ok,
            "exit": outcome.exit,
            "error": outcome.error,
            "seconds": round(outcome.seconds, 3),
        }

    def _advance(self) -> None:
        """Move the cursor up to the first event still waiting (or all that was read)."""
        cursor_seq = min(self.waiting) - 1 if self.waiting else self.read_to
        if cursor_seq != self.cursor:
            self.version += 1
            self.cursor = cursor_seq
            self.done_above = {seq for seq in self.done_above if seq > cursor_seq}

    async def _keep_saved(self) -> None:
        """Save the cursor after deliveries (at most every SAVE_GAP: one write for all that
        finished meanwhile), and now and then when it only moved past unwanted events."""
        while True:
            with anyio.move_on_after(SAVE_EVERY):
                await self.changed.wait()
            self.changed = anyio.Event()
            await self._save()
            await anyio.sleep(SAVE_GAP)

    async def _save(self) -> None:
        if self.version == self.saved:
            return
        version, state = self.version, cursor.Cursor(self.cursor, set(self.done_above), self.last)
        try:
            await anyio.to_thread.run_sync(cursor.save, self.runner.folder, self.hook.name, state)
        except OSError as exc:
            log.error(
                "hook %s: cannot save its cursor in %s: %s", self.hook.name, self.runner.folder, exc
            )
            return
        self.saved = version

    def status(self, last_seq: int) -> dict[str, Any]:
        """What `runnerctl hooks` shows: the hook, where it is, and its last result."""
        hook = self.hook
        return {
            "name": hook.name,
            "events": list(hook.events),
            "command": hook.command if isinstance(hook.command, str) else list(hook.command),
            "experiment": hook.experiment,
            "tags": hook.tags,
            "timeout": hook.timeout,
            "mode": hook.mode,
            "cursor": self.cursor,
            "backlog": len(self.waiting) + max(0, last_seq - self.read_to),
            "retrying": len(self.retrying),
            "calls": self.calls,
            "delivered": self.delivered,
            "failed": self.failed,
            "last": self.last,
        }
