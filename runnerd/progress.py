"""Whether a run is moving, judged from outside, and what to say when it is not.

A hung run often never stops heartbeating: runnerctl exec beats for its command, and the
client library beats from a thread of its own. So the daemon looks at what the run does
(`runnerd.evidence`): the CPU time of its processes and their descendants (from the
sampler's round, by process), the files it writes and the heartbeats its code sends on
purpose. A running run with no evidence of any kind for `stall_timeout` is `lost` with
cause `stalled`, and a note of what was measured; evidence brings it back to `running`.

Cheap by design: CPU is read once per process per round; files are looked at only when
a run is about to be declared stalled, when a stalled run is watched for a comeback, and
for a bounded number of runs per round (so that `show` can say what moved last).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from runnerd.evidence import Evidence, latest, look_at_files, stalled_note, stopped_note
from runnerd.registry import BatchResult, Registry, RunUpdate, Store, iso
from runnerd.states import Event, transition
from runnerd.usage import Group
from runnerd_client.protocol import State

SOURCE = "watchdog"
FILES_EVERY = 60.0
"""Seconds between looks at a run's files, when it is not about to be judged."""
FILES_PER_ROUND = 200
COMEBACK = ("stalled", "stopped")
"""Causes of `lost` that evidence of progress undoes (a missed heartbeat needs one)."""


# --- per run ----------------------------------------------------------------------------


@dataclass
class Watched:
    """What the tracker knows of a run from the registry."""

    state: State
    cause: str | None = None
    run_dir: str | None = None
    stall_timeout: float | None = None  # the run's own; None: the daemon's


@dataclass(frozen=True)
class Verdict:
    """A change the tracker asks the registry for: lost (with a note) or moving again."""

    run_id: str
    at: float
    cause: str  # stalled, stopped, or progress
    note: dict[str, Any] | None = None


class Progress:
    """Per-run evidence and a heap of stall due times, checked once per sampling round.

    Like the watchdog's timers, evidence only moves a due time later, so it touches no
    timer: when one comes due, the run's evidence is read afresh and it is either judged
    or put back at its true due time. `on_commit`, `load` and `heartbeat` run on the
    event loop, `check` on the sampler's worker thread: between them pass only deque
    appends and single assignments."""

    def __init__(self, stall_timeout: float) -> None:
        self.default_timeout = stall_timeout
        self.watched: dict[str, Watched] = {}
        self.evidence: dict[str, Evidence] = {}
        self._heap: list[tuple[float, str]] = []
        self._changes: deque[tuple[str, Watched | None, bool]] = deque()
        self._comeback: set[str] = set()  # lost for a cause progress undoes
        self._rotation: deque[str] = deque()  # running runs, each once, looked at in turn
        self._rotating: set[str] = set()
        self.moved: set[str] = set()  # runs whose evidence changed since the last round

    def timeout(self, run_id: str) -> float:
        watched = self.watched.get(run_id)
        own = watched.stall_timeout if watched is not None else None
        return self.default_timeout if own is None else own

    # --- on the event loop ---

    def learn(self, run_id: str, watched: Watched | None, loaded: bool = False) -> None:
        """A run's state (None: it ended), from the registry; applied at the next round.
        What was `loaded` (read when the run was first sampled) gives way to a transition
        learned meanwhile, except for the run's own settings."""
        self._changes.append((run_id, watched, loaded))

    def on_commit(self, result: BatchResult) -> None:
        """Learn every state change (a registry subscriber)."""
        for t in result.effects.transitions:
            row = result.rows.get(t.run_id)
            self.learn(t.run_id, Watched(t.to_state, t.cause, row.run_dir if row else None))

    async def load(self, registry: Registry, run_ids: list[str]) -> None:
        """The state and settings of runs sampled for the first time (after a restart, or
        once a run's first process is seen)."""
        found = await registry.read(lambda store: store.runs.liveness(run_ids))
        for run_id, (state, cause, run_dir, timeout) in found.items():
            self.learn(run_id, Watched(state, cause, run_dir, timeout), loaded=True)

    def submit(self, registry: Registry, verdicts: list[Verdict]) -> None:
        for verdict in verdicts:
            registry.submit_quietly(
                partial(apply_verdict, verdict=verdict),
                f"marking run {verdict.run_id} {verdict.cause}",
            )

    def heartbeat(self, run_id: str, at: float) -> None:
        """A heartbeat its code sent on purpose (not a library's or runnerctl's own)."""
        ev = self.evidence.get(run_id)
        if ev is not None:
            ev.beat_at = at
            self.moved.add(run_id)

    # --- on the sampler's thread ---

    def _apply_changes(self, now: float) -> None:
        while self._changes:
            run_id, watched, loaded = self._changes.popleft()
            if watched is None or watched.state.terminal:
                self.watched.pop(run_id, None)
                self.evidence.pop(run_id, None)
                self._comeback.discard(run_id)
                continue
            known = self.watched.get(run_id)
            if known is not None and loaded:
                known.stall_timeout, known.run_dir = watched.stall_timeout, watched.run_dir
                watched = known
            elif known is not None:
                watched.stall_timeout = known.stall_timeout
                watched.run_dir = watched.run_dir or known.run_dir
            self.watched[run_id] = watched
            ev = self.evidence.setdefault(run_id, Evidence(since=now))
            self._comeback.discard(run_id)
            ev.lost_at = None
            if watched.state is State.RUNNING and not loaded:
                ev.since = now  # running again: its window starts afresh
            if watched.state is State.RUNNING and self.timeout(run_id) > 0:
                heapq.heappush(self._heap, (ev.since + self.timeout(run_id), run_id))
                if run_id not in self._rotating:
                    self._rotating.add(run_id)
                    self._rotation.append(run_id)
            elif watched.state is State.LOST and watched.cause in COMEBACK:
                ev.lost_at = now
                self._comeback.add(run_id)

    def check(self, group_of: Callable[[str], Group | None], now: float) -> list[Verdict]:
        """Judge the runs whose stall is due, and the stalled ones for a comeback;
        `group_of` gives a run's sampled processes."""
        self._apply_changes(now)
        verdicts = [
            v
            for run_id in self._due(now)
            if (v := self._judge(run_id, group_of(run_id), now)) is not None
        ]
        for run_id in list(self._comeback):
            ev, group = self.evidence[run_id], group_of(run_id)
            self._look(run_id, group, now, FILES_EVERY)
            at, kind = latest(group, ev)
            if ev.lost_at is not None and at > ev.lost_at:
                ev.lost_at = None
                self._comeback.discard(run_id)
                verdicts.append(Verdict(run_id, now, "progress", {"kind": kind}))
        self._rotate(group_of, now)
        return verdicts

    def _due(self, now: float) -> list[str]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[1])
        return list(dict.fromkeys(due))

    def _judge(self, run_id: str, group: Group | None, now: float) -> Verdict | None:
        watched, ev = self.watched.get(run_id), self.evidence.get(run_id)
        timeout = self.timeout(run_id)
        if watched is None or ev is None or watched.state is not State.RUNNING or timeout <= 0:
            return None
        if group is None:  # no live process sampled yet: nothing to judge by
            heapq.heappush(self._heap, (now + timeout, run_id))
            return None
        self._look(run_id, group, now, 0.0)
        at, _kind = latest(group, ev)
        if now - at < timeout:
            heapq.heappush(self._heap, (at + timeout, run_id))
            return None
        note = (
            stopped_note(group.roots)
            if group.stopped
            else stalled_note(group, ev, watched.run_dir, now - at, timeout)
        )
        if note is None:  # its processes were stopped a moment ago, and no longer are
            heapq.heappush(self._heap, (now + timeout, run_id))
            return None
        watched.state = State.LOST  # until the registry says otherwise
        return Verdict(run_id, now, note["cause"], note)

    def _look(self, run_id: str, group: Group | None, now: float, every: float) -> None:
        ev, watched = self.evidence[run_id], self.watched.get(run_id)
        if now - ev.files_checked_at < every:
            return
        before = (ev.files.at, ev.files.kind)
        ev.files = look_at_files(
            watched.run_dir if watched else None, group.roots if group is not None else ()
        )
        ev.files_checked_at = now
        if (ev.files.at, ev.files.kind) != before:
            self.moved.add(run_id)

    def _rotate(self, group_of: Callable[[str], Group | None], now: float) -> None:
        """Look at the files of a few runs whose CPU is still, so `show` says what moved."""
        for _ in range(min(FILES_PER_ROUND, len(self._rotation))):
            run_id = self._rotation.popleft()
            watched = self.watched.get(run_id)
            if watched is None or watched.state is not State.RUNNING:
                self._rotating.discard(run_id)
                continue
            group = group_of(run_id)
            if group is None or group.moved_at is None or now - group.moved_at > FILES_EVERY:
                self._look(run_id, group, now, FILES_EVERY)
            self._rotation.append(run_id)

    def public(self, run_id: str, group: Group | None) -> dict[str, Any] | None:
        """What a run object shows of it: when it last moved, and how."""
        ev = self.evidence.get(run_id)
        if ev is None:
            return None
        at, kind = latest(group, ev)
        return {"at": iso(at), "kind": kind, "stall_timeout": self.timeout(run_id)}


# --- in the registry ----------------------------------------------------------------------


def apply_verdict(store: Store, verdict: Verdict) -> None:
    """Lost with its note, or running again, if the run is still as the tracker saw it."""
    row = store.runs.get(verdict.run_id)
    if row is None:
        return
    if verdict.cause == "progress":
        if row.state is State.LOST and store.runs.last_cause(verdict.run_id) in COMEBACK:
            alive = RunUpdate(last_heartbeat_at=max(verdict.at, row.last_heartbeat_at or 0.0))
            transition(
                store, row, Event.HEARTBEAT, verdict.at, SOURCE, cause="progress", change=alive
            )
        return
    if row.state is State.RUNNING and verdict.note is not None:
        store.runs.note_stall(verdict.run_id, verdict.at, verdict.note)
        transition(
            store,
            row,
            Event.HEARTBEAT_MISSED,
            verdict.at,
            SOURCE,
            cause=verdict.cause,
            change=RunUpdate(lost_at=verdict.at),
        )
