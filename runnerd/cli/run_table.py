"""Runs as a table (`list`, `status`'s active runs): one row each, its columns (runtime,
peak memory, CPU, when it last made progress) computed from the run object."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from runnerd.cli.common import ago, failure_summary, local_time, span, table


def runtime(run: dict[str, Any]) -> str:
    if not run.get("started_at"):
        return "-"
    end = (
        datetime.fromisoformat(run["ended_at"]).timestamp() if run.get("ended_at") else time.time()
    )
    return span(end - datetime.fromisoformat(run["started_at"]).timestamp())


def peak_memory(run: dict[str, Any]) -> str:
    use = run.get("resources")
    return human_bytes(use["peak_rss_bytes"]) if use else "-"


def cpu_time(run: dict[str, Any]) -> str:
    use = run.get("resources")
    return f"{use['cpu_seconds']:.1f}s" if use else "-"


def human_bytes(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def moved(run: dict[str, Any]) -> str:
    """When an active run last made progress, and of what kind (cpu, output, files...)."""
    progress = (run.get("resources") or {}).get("progress")
    if not progress or run["state"] not in ("pending", "running", "lost"):
        return "-"
    return f"{ago(progress['at'])} ({progress['kind']})"


def runs_table(runs: Sequence[dict[str, Any]], hosts: bool = False, progress: bool = False) -> str:
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
            (r.get("host") or "-",) * hosts
            + (
                r["run_id"],
                r["experiment"],
                r["variation"],
                r["attempt"],
                r["state"],
                local_time(r["created_at"]),
                runtime(r),
                peak_memory(r),
                cpu_time(r),
            )
            + (moved(r),) * progress
            + (failure_summary(r),)
            for r in runs
        ],
    )
