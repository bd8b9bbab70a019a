"""What goes into the store and what comes out of it, typed: callers never name a column.

Also the helper its subjects share: WHERE clauses of optional filters (times as the public
objects show them are `runnerd.times.iso`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from runnerd_client.protocol import State


@dataclass(frozen=True, slots=True)
class RunRow:
    """A run as stored: times in epoch seconds, params, tags and launch as JSON text."""

    run_id: str
    experiment: str
    variation: str
    attempt: int
    state: State
    params_json: str
    tags_json: str
    cwd: str | None
    run_dir: str | None
    host: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    last_heartbeat_at: float | None
    lost_at: float | None
    heartbeat_seq: int
    heartbeats: int
    heartbeat_timeout: float | None
    lost_grace: float | None
    deadline: float | None
    retry_of: str | None
    launch_json: str | None
    sweep_id: str | None
    cell: int | None
    resumed_from: str | None
    claim_token: str | None

    @classmethod
    def of(cls, row: Sequence[Any]) -> RunRow:
        """From a row of the runs table's columns, in order (`schema.RUN_COLUMNS`)."""
        return cls(row[0], row[1], row[2], row[3], State(row[4]), *row[5:])

    @property
    def failed(self) -> bool:
        return self.state.startswith("failed")

    def params(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.params_json)
        return value

    def tags(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.tags_json or "{}")
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class SweepRow:
    """A sweep as stored (its spec as JSON text)."""

    sweep_id: str
    experiment: str
    failure_policy: str
    spec_json: str
    folder: str
    status: str
    driver_pid: int | None
    driver_start: int | None
    created_at: float
    ended_at: float | None


@dataclass(frozen=True, slots=True)
class CellRow:
    """What claiming a cell looks at: its variation and params, and its latest attempt."""

    variation: str
    params_json: str
    latest_run_id: str | None
    attempts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureRecord:
    """A failure record of SPEC §3 as stored (`at` in epoch seconds), with its signature and
    the diagnosis of it."""

    failure_class: str
    message: str
    reason: str
    at: float
    signature: str
    category: str | None = None
    retryable: bool | None = None
    traceback: str | None = None
    phase: str | None = None
    exit_code: int | None = None
    signal: str | None = None

    @classmethod
    def of(cls, row: Sequence[Any]) -> FailureRecord:
        """From a row of the failures table's columns, in order (`schema.FAILURE_COLUMNS`)."""
        (
            failure_class,
            message,
            traceback,
            phase,
            reason,
            signature,
            category,
            retryable,
            exit_code,
            signal,
            at,
        ) = row
        return cls(
            failure_class=failure_class,
            message=message,
            traceback=traceback,
            phase=phase,
            reason=reason,
            signature=signature,
            category=category,
            retryable=None if retryable is None else bool(retryable),
            exit_code=exit_code,
            signal=signal,
            at=at,
        )

    def as_dict(self) -> dict[str, Any]:
        """Its fields by name, as the diagnosis rules read a record."""
        return asdict(self)


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
    claim_token: str | None = None


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
        return {name: value for name in _UPDATABLE if (value := getattr(self, name)) is not None}


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
