"""Runs as a table (`list`, `status`'s active runs): one row each, its columns (runtime,
peak memory, CPU, when it last made progress) computed from the run object; and `typed`,
how the commands read a reply they show as its class (`runnerd_client.replies`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from runnerd.cli.common import EXIT_ERROR, ago, fail, local_time, say, span, table
from runnerd_client.replies import FailureInfo, MalformedReply, RunInfo, decode

T = TypeVar("T")


def typed(cls: type[T], value: Any, reply: str) -> T:
    """A reply (or a run read from a file) as `cls`; one that lacks a field exits 1 naming
    it. `--json` prints the maps themselves, with any field a newer daemon adds."""
    try:
        return decode(cls, value, reply)
    except MalformedReply as exc:
        fail(exc.message, EXIT_ERROR)


def typed_runs(runs: Iterable[Any], reply: str) -> list[RunInfo]:
    """Runs of a reply, or read from files (each names its source in `daemon`); one that
    lacks a field is named on stderr and left out, so one bad record hides no other."""
    typed_ones = []
    for n, run in enumerate(runs):
        source = f"run {run['run_id']} of {run['daemon']}" if "daemon" in run else f"{reply}[{n}]"
        try:
            typed_ones.append(decode(RunInfo, run, source))
        except MalformedReply as exc:
            say(f"runnerctl: warning: {exc.message} (left out)", err=True)
    return typed_ones


def runtime(run: RunInfo) -> str:
    if not run.started_at:
        return "-"
    end = datetime.fromisoformat(run.ended_at).timestamp() if run.ended_at else time.time()
    return span(end - datetime.fromisoformat(run.started_at).timestamp())


def peak_memory(run: RunInfo) -> str:
    return human_bytes(run.resources["peak_rss_bytes"]) if run.resources else "-"


def cpu_time(run: RunInfo) -> str:
    return f"{run.resources['cpu_seconds']:.1f}s" if run.resources else "-"


def human_bytes(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def moved(run: RunInfo) -> str:
    """When an active run last made progress, and of what kind (cpu, output, files...)."""
    progress = (run.resources or {}).get("progress")
    if not progress or run.state not in ("pending", "running", "lost"):
        return "-"
    return f"{ago(progress['at'])} ({progress['kind']})"


def failure_line(failure: FailureInfo | None) -> str:
    """A failure in a table cell: its class and the first line of its message."""
    if failure is None:
        return ""
    message = failure.message.splitlines()[0] if failure.message else ""
    text = f"{failure.failure_class}: {message}" if message else failure.failure_class
    return text[:60]


def runs_table(runs: Sequence[RunInfo], hosts: bool = False, progress: bool = False) -> str:
    """With `hosts` (several daemons), a HOST column comes first; with `progress`, a MOVED
    column says when each last made progress."""
    return table(
        ("HOST",) * hosts
        + (
            "RUN",
            "EXPERIMENT",
            "VARIATION",
            "ATT",
            "STATE",
            "CREATED",
            "RUNTIME",
            "PEAK MEM",
            "CPU",
        )
        + ("MOVED",) * progress
        + ("FAILURE",),
        [
            (r.host or "-",) * hosts
            + (
                r.run_id,
                r.experiment,
                r.variation,
                r.attempt,
                r.state,
                local_time(r.created_at),
                runtime(r),
                peak_memory(r),
                cpu_time(r),
            )
            + (moved(r),) * progress
            + (failure_line(r.failure),)
            for r in runs
        ],
    )
