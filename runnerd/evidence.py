"""Signs that a run is moving, gathered from outside: what its processes and files show.

The progress tracker (`runnerd.progress`) judges from these: the CPU time its group of
processes used (`runnerd.usage`), the heartbeats its code sends on purpose, and the files
it writes (its stdout/stderr logs, anything under its run_dir, and the files its
processes' stdout and stderr go to). The notes a stalled or stopped run is marked `lost`
with say what was measured: the state, wait channel and system call of each process, the
CPU and bytes written, and the last line of its output. runnerctl exec and the watchdog
ask `stopped_note` too, to tell a stopped command from a quiet one.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from runnerd.usage import Group
from runnerd_client.procinfo import fd_target, frozen, process_facts, read_proc, tree

MAX_ENTRIES = 5_000
"""Entries looked at under one run_dir (a folder of a million checkpoints is not walked)."""
TAIL = 4096
LOGS = ("stdout.log", "stderr.log")
OWN = "metadata.json"
"""runnerd's own file in a run folder: written at each state change (a stall's too), so
never evidence that the run moved, or a stalled run would come back at every look."""


# --- what its processes show ---------------------------------------------------------


def describe(facts: dict[str, Any]) -> str:
    """'process 123 (python) sleeping in do_wait (wait4)' and the like."""
    word = {
        "T": "stopped",
        "t": "stopped by a tracer",
        "D": "waiting on I/O",
        "R": "running",
        "S": "sleeping",
    }.get(facts["state"], f"in state {facts['state']}")
    where = " ".join(
        filter(
            None,
            (
                facts["wchan"] and f"in {facts['wchan']}",
                facts["syscall"] and f"({facts['syscall']})",
            ),
        )
    )
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
    return {
        "cause": "stopped",
        "processes": facts,
        "message": "stopped: " + "; ".join(describe(f) for f in leaves[:4]),
    }


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
                if (
                    target is not None
                    and target.startswith("/")
                    and stat.S_ISREG(os.stat(target).st_mode)
                    and target not in found
                ):
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
                    elif stat.S_ISREG(info.st_mode) and not _ours(entry.name, entry.path, run_dir):
                        kind = (
                            "output"
                            if entry.name in LOGS and os.path.dirname(entry.path) == run_dir
                            else "files"
                        )
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


def _ours(name: str, path: str, run_dir: str) -> bool:
    """Whether a file in the run folder is runnerd's metadata.json (or its temporary)."""
    own = name == OWN or (name.startswith(f".{OWN}.") and name.endswith(".tmp"))
    return own and os.path.dirname(path) == run_dir


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


# --- a run's signs of progress ---------------------------------------------------------


@dataclass
class Evidence:
    """A run's latest signs of progress besides its processes' CPU."""

    since: float  # watched since (the daemon's start, or the run's)
    beat_at: float | None = None
    files: Files = field(default_factory=Files)
    files_checked_at: float = float("-inf")
    lost_at: float | None = None  # lost for a cause progress undoes: since when


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


def stalled_note(
    group: Group, ev: Evidence, run_dir: str | None, idle: float, timeout: float
) -> dict[str, Any]:
    """What was measured of a run that stalled: its processes (and what each waits in),
    CPU, bytes written and last output line."""
    facts = [f for pid in tree(group.roots) if (f := process_facts(pid)) is not None][:8]
    line = last_line(ev.files.output)
    cpu = group.cpu
    parts = [
        f"no progress for {idle:.0f} s (stall_timeout {timeout:g} s): "
        f"{cpu:.2f} CPU-s in all, {ev.files.bytes} bytes in its files"
    ]
    waiting = [f for f in facts if f["state"] not in "R"] or facts
    if waiting:
        parts.append("; ".join(describe(f) for f in waiting[:3]))
    if line is not None:
        parts.append(f"last output: {line!r}")
    return {
        "cause": "stalled",
        "idle_seconds": round(idle, 1),
        "stall_timeout": timeout,
        "cpu_seconds": round(cpu, 3),
        "bytes": ev.files.bytes,
        "last_output": line,
        "run_dir": run_dir,
        "processes": facts,
        "message": "; ".join(parts),
    }
