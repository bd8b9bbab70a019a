"""Evidence that a run is moving, measured from outside, and what to say when it is not.

A hung run often never stops heartbeating: runnerctl exec beats for its command, and the
client library beats from a thread of its own. So the daemon looks at what the run does:
the CPU time of its processes and their descendants (from the sampler's round, by
process), the files it writes (its stdout/stderr logs, anything under its run_dir, and
the files its processes' stdout and stderr go to) and the heartbeats its code sends on
purpose. A running run with no evidence of any kind for `stall_timeout` is `lost` with
cause `stalled`, and a note of what was measured; evidence brings it back to `running`.

Cheap by design: CPU is read once per process per round; files are looked at only when
a run is about to be declared stalled, when a stalled run is watched for a comeback, and
for a bounded number of runs per round (so that `show` can say what moved last).
"""

from __future__ import annotations

import contextlib
import heapq
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from runnerd.registry import BatchResult, Registry, RunUpdate, Store, iso
from runnerd.resources import Group
from runnerd.states import Event, transition
from runnerd_client.procinfo import fd_target, frozen, process_facts, read_proc, tree
from runnerd_client.protocol import State

SOURCE = "watchdog"
FILES_EVERY = 60.0
"""Seconds between looks at a run's files, when it is not about to be judged."""
FILES_PER_ROUND = 200
MAX_ENTRIES = 5_000
"""Entries looked at under one run_dir (a folder of a million checkpoints is not walked)."""
TAIL = 4096
LOGS = ("stdout.log", "stderr.log")
COMEBACK = ("stalled", "stopped")
"""Causes of `lost` that evidence of progress undoes (a missed heartbeat needs one)."""


# --- what its processes show ---------------------------------------------------------


def describe(facts: dict[str, Any]) -> str:
    """'process 123 (python) sleeping in do_wait (wait4)' and the like."""
    word = {"T": "stopped", "t": "stopped by a tracer", "D": "waiting on I/O",
            "R": "running", "S": "sleeping"}.get(facts["state"], f"in state {facts['state']}")
    where = " ".join(filter(None, (facts["wchan"] and f"in {facts['wchan']}",
                                   facts["syscall"] and f"({facts['syscall']})")))
    return f"process {facts['pid']} ({facts['name']}) {word}" + (f" {where}" if where else "")


def stopped_note(roots: Iterable[int]) -> dict[str, Any] | None:
    """If every leaf process of a run's tree is stopped (T, t) or frozen, what says so: a
    supervisor waiting on a stopped command (runnerctl exec) does not count as moving."""
    pids = tree(roots)
    facts = [f for pid in pids if (f := process_facts(pid)) is not None]
    if not facts:
        return None
    parents = {p for pid in pids if (proc := read_proc(pid)) is not None for p in (proc.ppid,)}
    leaves = [f for f in facts if f["pid"] not in parents] or facts
    if not all(f["state"] in "Tt" or frozen(f["pid"]) for f in leaves):
        return None
    return {"cause": "stopped", "processes": facts,
            "message": "stopped: " + "; ".join(describe(f) for f in leaves[:4])}


# --- files the run writes -------------------------------------------------------------


@dataclass
class Files:
    """What a run's files show: the newest write, of which kind, and the bytes in all."""

    at: float | None = None
    kind: str | None = None
    bytes: int = 0
    output: list[str] = field(default_factory=list)  # its output files, newest first


def output_targets(pids: Iterable[int]) -> list[str]:
    """The regular files the processes' stdout and stderr go to (`cmd > out.log`)."""
    found = []
    for pid in pids:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                target = fd_target(pid, fd)
                if target is not None and target.startswith("/") \
                        and stat.S_ISREG(os.stat(target).st_mode) and target not in found:
                    found.append(target)
    return found


def look_at_files(run_dir: str | None, roots: Iterable[int]) -> Files:
    """The newest modification among the run's logs, the files under its run_dir (a
    bounded walk, no symlinks followed) and its processes' output files."""
    seen = Files()
    outputs: list[tuple[float, str]] = []
    if run_dir:
        entries, todo = 0, [run_dir]
        while todo and entries < MAX_ENTRIES:
            with contextlib.suppress(OSError), os.scandir(todo.pop()) as folder:
                for entry in folder:
                    entries += 1
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(info.st_mode):
                        todo.append(entry.path)
                    elif stat.S_ISREG(info.st_mode):
                        kind = "output" if entry.name in LOGS and \
                            os.path.dirname(entry.path) == run_dir else "files"
                        _newer(seen, info.st_mtime, kind, info.st_size)
                        if kind == "output":
                            outputs.append((info.st_mtime, entry.path))
    for target in output_targets(roots):
        with contextlib.suppress(OSError):
            info = os.stat(target)
            if not run_dir or not target.startswith(run_dir.rstrip("/") + "/"):
                _newer(seen, info.st_mtime, "output", info.st_size)
                outputs.append((info.st_mtime, target))
    seen.output = [path for _, path in sorted(outputs, reverse=True)]
    return seen


def _newer(seen: Files, mtime: float, kind: str, size: int) -> None:
    seen.bytes += size
    if seen.at is None or mtime > seen.at:
        seen.at, seen.kind = mtime, kind


def last_line(paths: list[str]) -> str | None:
    """The last non-empty line of the newest output file that has one (up to 200 chars)."""
    for path in paths:
        with contextlib.suppress(OSError), open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - TAIL))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines()]
            lines = [ln for ln in lines if ln]
            if lines:
                return lines[-1][:200]
    return None


# --- per run ----------------------------------------------------------------------------


@dataclass
class Watched:
    """What the tracker knows of a run from the registry."""

    state: State
    cause: str | None = None
    run_dir: str | None = None
    stall_timeout: float | None = None  # the run's own; None: the daemon's


@dataclass
class Evidence:
    """A run's latest signs of progress besides its processes' CPU."""

    since: float  # watched since (the daemon's start, or the run's)
    beat_at: float | None = None
    files: Files = field(default_factory=Files)
    files_checked_at: float = float("-inf")
    lost_at: float | None = None  # lost for a cause progress undoes: since when


@dataclass(frozen=True)
class Verdict:
    """A change the tracker asks the registry for: lost (with a note) or moving again."""

    run_id: str
    at: float
    cause: str  # stalled, stopped, or progress
    note: dict[str, Any] | None = None


def latest(group: Group | None, ev: Evidence) -> tuple[float, str]:
    """When the run last moved, and how."""
    candidates = [(ev.since, "start")]
    if group is not None and group.moved_at is not None:
        candidates.append((group.moved_at, "cpu"))
    if ev.beat_at is not None:
        candidates.append((ev.beat_at, "heartbeat"))
    if ev.files.at is not None and ev.files.kind is not None:
        candidates.append((ev.files.at, ev.files.kind))
    return max(candidates)


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
            registry.submit_quietly(partial(apply_verdict, verdict=verdict),
                                    f"marking run {verdict.run_id} {verdict.cause}")

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
        verdicts = [v for run_id in self._due(now)
                    if (v := self._judge(run_id, group_of(run_id), now)) is not None]
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
        note = stopped_note(group.roots) if group.stopped else \
            stalled_note(group, ev, watched, now - at, timeout)
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
        ev.files = look_at_files(watched.run_dir if watched else None,
                                 group.roots if group is not None else ())
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


def stalled_note(group: Group, ev: Evidence, watched: Watched, idle: float,
                 timeout: float) -> dict[str, Any]:
    """What was measured of a run that stalled: its processes (and what each waits in),
    CPU, bytes written and last output line."""
    facts = [f for pid in tree(group.roots) if (f := process_facts(pid)) is not None][:8]
    line = last_line(ev.files.output)
    cpu = group.cpu
    parts = [f"no progress for {idle:.0f} s (stall_timeout {timeout:g} s): "
             f"{cpu:.2f} CPU-s in all, {ev.files.bytes} bytes in its files"]
    waiting = [f for f in facts if f["state"] not in "R"] or facts
    if waiting:
        parts.append("; ".join(describe(f) for f in waiting[:3]))
    if line is not None:
        parts.append(f"last output: {line!r}")
    return {"cause": "stalled", "idle_seconds": round(idle, 1), "stall_timeout": timeout,
            "cpu_seconds": round(cpu, 3), "bytes": ev.files.bytes, "last_output": line,
            "run_dir": watched.run_dir, "processes": facts, "message": "; ".join(parts)}


# --- in the registry ----------------------------------------------------------------------


def apply_verdict(store: Store, verdict: Verdict) -> None:
    """Lost with its note, or running again, if the run is still as the tracker saw it."""
    row = store.runs.get(verdict.run_id)
    if row is None:
        return
    if verdict.cause == "progress":
        if row.state is State.LOST and store.runs.last_cause(verdict.run_id) in COMEBACK:
            alive = RunUpdate(last_heartbeat_at=max(verdict.at, row.last_heartbeat_at or 0.0))
            transition(store, row, Event.HEARTBEAT, verdict.at, SOURCE, cause="progress",
                       change=alive)
        return
    if row.state is State.RUNNING and verdict.note is not None:
        store.runs.note_stall(verdict.run_id, verdict.at, verdict.note)
        transition(store, row, Event.HEARTBEAT_MISSED, verdict.at, SOURCE, cause=verdict.cause,
                   change=RunUpdate(lost_at=verdict.at))
