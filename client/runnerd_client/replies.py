"""What the daemon answers about runs, sweeps and itself, typed: frozen, slotted dataclasses
whose fields, in order, are the keys of the wire map (SPEC §3, §6, §8). They become maps in
one place, `framing.fields_of` (`as_map` for a whole reply); only the daemon builds them,
so a client that reads maps never imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runnerd_client.framing import as_map, fields_of

__all__ = ["as_map", "fields_of"]  # and the reply classes below


@dataclass(frozen=True, slots=True)
class FailureInfo:
    """A failure record (SPEC §3); `at` in ISO 8601."""

    run_id: str
    failure_class: str
    message: str
    traceback: str | None
    phase: str | None
    reason: str
    signature: str
    category: str | None
    retryable: bool | None
    exit_code: int | None
    signal: str | None
    at: str | None


@dataclass(frozen=True, slots=True)
class ListedFailure(FailureInfo):
    """A failure listed on its own names its run's experiment, variation and host."""

    experiment: str
    variation: str
    host: str | None


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Failures sharing a class, signature or category, largest group first."""

    key: str
    count: int
    first_seen: str | None
    last_seen: str | None
    run_ids: list[str]
    example: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """The public run object (SPEC §6); times in ISO 8601."""

    run_id: str
    experiment: str
    variation: str
    attempt: int
    state: str
    cwd: str | None
    run_dir: str | None
    host: str | None
    heartbeats: int
    heartbeat_timeout: float | None
    lost_grace: float | None
    deadline: float | None
    retry_of: str | None
    resumed_from: str | None
    sweep_id: str | None
    cell: int | None
    params: dict[str, Any]
    launch: dict[str, Any] | None
    tags: dict[str, Any]
    created_at: str | None
    started_at: str | None
    ended_at: str | None
    last_heartbeat_at: str | None
    pids: list[int]
    resources: dict[str, Any] | None
    failure: FailureInfo | None


@dataclass(frozen=True, slots=True)
class TransitionInfo:
    seq: int
    at: str | None
    from_: str | None
    to: str
    cause: str
    source: str


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    path: str
    size: int
    sha256: str
    registered_at: str | None


@dataclass(frozen=True, slots=True)
class CrashFileInfo:
    path: str
    kind: str
    size: int
    at: str | None


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    seq: int
    data: dict[str, Any]
    path: str | None
    at: str | None


@dataclass(frozen=True, slots=True)
class ResumeCheckpoint:
    """The checkpoint a resumed attempt starts from, and the attempt that saved it."""

    run_id: str
    seq: int
    data: dict[str, Any]
    path: str | None
    at: str | None


@dataclass(frozen=True, slots=True)
class RunDetails(RunInfo):
    """A run with its history, for `get` (runnerctl show)."""

    transitions: list[TransitionInfo]
    artifacts: list[ArtifactInfo]
    crash_files: list[CrashFileInfo]
    checkpoints: list[CheckpointInfo]


@dataclass(frozen=True, slots=True)
class CellInfo:
    """A sweep's cell with its latest attempt's state and failure (SPEC §8)."""

    index: int
    params: dict[str, Any]
    variation: str
    run_id: str | None
    attempts: int
    state: str
    host: str | None
    failure: FailureInfo | None


@dataclass(frozen=True, slots=True)
class SweepInfo:
    """A sweep without its cells: what `sweep list` and `sweep show` start from."""

    sweep_id: str
    experiment: str
    failure_policy: str
    spec: dict[str, Any]
    folder: str
    manifest: str
    status: str
    created_at: str | None
    ended_at: str | None
    driver_pid: int | None
    cells_summary: dict[str, int]


@dataclass(frozen=True, slots=True)
class DaemonInfo:
    version: str
    protocol: int
    pid: int
    uptime_sec: float
    socket: str
    db: str
    db_bytes: int
    clients: int


@dataclass(frozen=True, slots=True)
class StatusInfo:
    """`status`: runs by state, the newest active runs and failures, and the daemon."""

    counts: dict[str, int]
    active: list[RunInfo]
    failures: list[ListedFailure]
    daemon: DaemonInfo
