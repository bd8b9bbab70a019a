"""What every way of running a sweep shares: the cells planned, the options of a turn,
how each cell ended, and the error a fail_fast sweep raises.

A *turn* is one `rd.sweep`, `rd.resume_sweep`, `runnerctl sweep run|resume|replicate`:
it runs some planned cells of a stored sweep, each as one or more attempts (runs).
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from runnerd_client.cells import variation
from runnerd_client.fields import (
    Backoff,
    Jobs,
    Name,
    OneOf,
    RetryCount,
    RetryWhen,
    check_fields,
)
from runnerd_client.protocol import SweepPolicy

OUTCOME_STATES = ("succeeded", "failed", "abandoned", "skipped", "taken")


@dataclass(frozen=True)
class PlannedCell:
    """A cell to run in this turn, and the attempt it follows (None: its first).
    `recorded_as` is the cell's name in the daemon's record, when it was read from there:
    its runs and outcomes are named so (a sweep recorded when names had their keys sorted
    keeps them)."""

    index: int
    params: dict[str, Any]
    claim_after: str | None = None
    recorded_as: str | None = None

    @classmethod
    def recorded(cls, cell: Mapping[str, Any], *, after_latest: bool = True) -> PlannedCell:
        """A cell as the daemon's sweep reply has it, under its recorded name, planned as
        the attempt after its latest one (`after_latest`, a resume) or after none."""
        claim_after = cell["run_id"] if after_latest else None
        return cls(cell["index"], cell["params"], claim_after, cell["variation"])

    @property
    def variation(self) -> str:
        return self.recorded_as or variation(self.params)


@dataclass(frozen=True)
class Attempt:
    """One attempt of a planned cell in this turn (`number` 1 is the turn's first)."""

    cell: PlannedCell
    number: int = 1
    claim_after: str | None = None
    retry_of: str | None = None

    def next(self, run_id: str | None) -> Attempt:
        """The retry after this attempt, whose run was `run_id`."""
        return Attempt(self.cell, self.number + 1, run_id, run_id)


@dataclass(frozen=True)
class SweepOptions:
    """How one turn runs its cells. With `replication`, attempts are linked to their cells
    without claiming them (`sweep replicate`): the sweep's outcomes stay as they were.
    A value out of bounds (jobs=0, retry_on="x") raises TypeError or ValueError."""

    experiment: Name
    sweep_id: str
    failure_policy: Annotated[str, OneOf.of(SweepPolicy)] = SweepPolicy.FAIL_FAST
    jobs: Jobs = 1
    retries: RetryCount = 0
    backoff: Backoff = 2.0
    retry_on: RetryWhen = "retryable"
    resume: bool = False
    replication: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def policy(self) -> str:
        return self.failure_policy

    @classmethod
    def of(
        cls,
        stored: dict[str, Any],
        *,
        jobs: int | None = None,
        policy: str | None = None,
        resume: bool = False,
        replication: str | None = None,
    ) -> SweepOptions:
        """The options a stored sweep (as `SweepGet` gives it) was made with, `jobs` and
        `policy` overriding them."""
        spec = stored["spec"]
        return cls(
            stored["experiment"],
            stored["sweep_id"],
            policy if policy is not None else stored["failure_policy"],
            jobs if jobs is not None else spec.get("jobs") or 1,
            spec.get("retries", 0),
            spec.get("backoff", 2.0),
            spec.get("retry_on", "retryable"),
            resume,
            replication,
        )

    @property
    def fail_fast(self) -> bool:
        return self.policy == SweepPolicy.FAIL_FAST


@dataclass
class CellOutcome:
    """How one cell ended in this turn: `state` is succeeded, failed, abandoned (stopped by
    fail_fast or a signal), skipped (never started) or taken (claimed by another driver of
    the sweep). `attempts` is the cell's count of attempts in the sweep, as manifest.json
    has it; `failure` its latest attempt's failure as the daemon recorded it, `recorded_as`
    the cell's name there (a sweep recorded when names had their keys sorted keeps them)."""

    index: int
    params: dict[str, Any]
    state: str
    run_id: str | None = None
    attempts: int = 0
    value: Any = None
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)
    failure: dict[str, Any] | None = field(default=None, repr=False)
    diagnosis: dict[str, Any] | None = field(default=None, repr=False)
    stderr_tail: bytes = field(default=b"", repr=False)
    recorded_as: str | None = field(default=None, repr=False)

    @property
    def variation(self) -> str:
        return self.recorded_as or variation(self.params)


@dataclass
class SweepResult:
    """The outcomes of this turn, the whole sweep's cells summary, and its manifest."""

    sweep_id: str
    outcomes: list[CellOutcome]
    summary: dict[str, int]
    manifest: Path | None
    status: str

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.state == "failed"]


class SweepFailed(Exception):
    """Raised by `rd.sweep` and `rd.resume_sweep` under fail_fast once a cell failed and
    the sweep was stopped and its manifest written: `sweep_id`, the failing `cell` (its
    index, params, run_id, error), `manifest`, and the whole `result`. The cell's own
    exception is the `__cause__`."""

    def __init__(self, result: SweepResult, cell: CellOutcome) -> None:
        super().__init__(
            f"sweep {result.sweep_id} stopped by fail_fast: cell {cell.index}"
            f" ({cell.variation}) failed: {cell.error}; manifest {result.manifest}"
        )
        self.result, self.cell = result, cell
        self.sweep_id, self.manifest = result.sweep_id, result.manifest

    def __reduce__(self) -> tuple[Any, ...]:
        return (SweepFailed, (self.result, self.cell))


@dataclass(frozen=True)
class Stop:
    """Why a turn stops its running cells: recorded as each one's failed_abandoned
    failure (class, message, and the transition's cause)."""

    failure_class: str
    message: str
    cause: str | None = None
    signum: int = signal.SIGTERM

    @classmethod
    def fail_fast(cls, index: int) -> Stop:
        return cls("FailFast", f"stopped by fail_fast: cell {index} failed", "fail_fast")
