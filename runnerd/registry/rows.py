"""What goes into the store and what comes out of it, typed: callers never name a column.

Also the helpers its subjects share: times as the public objects show them, and WHERE
clauses of optional filters."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC, the form every public run object uses."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def where(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause of the conditions whose value is given, and their arguments."""
    used = [(clause, value) for clause, value in conditions if value is not None]
    clause = f"WHERE {' AND '.join(clause for clause, _ in used)}" if used else ""
    return clause, [value for _, value in used]


@dataclass(frozen=True, slots=True, kw_only=True)
class NewRun:
    """A run to create (pending); params, tags and launch are JSON already checked."""

    run_id: str
    experiment: str
    variation: str
    params_json: str
    tags_json: str
    created_at: float
    cwd: str | None = None
    run_dir: str | None = None
    host: str | None = None
    retry_of: str | None = None
    launch_json: str | None = None
    sweep_id: str | None = None
    cell: int | None = None
    resumed_from: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunUpdate:
    """What a transition (or a heartbeat) changes in a run besides its state; None leaves a
    value as it is."""

    started_at: float | None = None
    ended_at: float | None = None
    lost_at: float | None = None
    last_heartbeat_at: float | None = None
    heartbeat_seq: int | None = None
    heartbeats: int | None = None
    heartbeat_timeout: float | None = None
    lost_grace: float | None = None
    deadline: float | None = None

    def changed(self) -> dict[str, Any]:
        """The values given, by name."""
        return {name: value for name in _UPDATABLE
                if (value := getattr(self, name)) is not None}


_UPDATABLE = tuple(f.name for f in fields(RunUpdate))
NO_CHANGE = RunUpdate()


@dataclass(frozen=True, slots=True, kw_only=True)
class NewSweep:
    """A sweep to create, running and driven by the process that asked; its spec is JSON."""

    sweep_id: str
    experiment: str
    failure_policy: str
    spec_json: str
    folder: str
    driver_pid: int
    driver_start: int | None
    created_at: float
