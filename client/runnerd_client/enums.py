"""The closed sets of the protocol: run states, why a run failed, what a sweep does on a
failure and how it ended, what `failures` groups by, what `export` pages, what a label says,
which failures are retried.
Each is an enum; the request fields that take one check their values against it."""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    """Run states (SPEC §2)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED_CRASH = "failed_crash"
    FAILED_ABANDONED = "failed_abandoned"
    FAILED_TIMEOUT = "failed_timeout"
    LOST = "lost"
    FAILED_LOST = "failed_lost"

    @property
    def terminal(self) -> bool:
        return self not in (State.PENDING, State.RUNNING, State.LOST)


ACTIVE_STATES = (State.PENDING, State.RUNNING, State.LOST)


class FailReason(enum.StrEnum):
    """Why a run failed; `lost` is the daemon's alone."""

    CRASH = "crash"
    ABANDONED = "abandoned"
    TIMEOUT = "timeout"
    LOST = "lost"


class GroupBy(enum.StrEnum):
    """What `failures` may group by."""

    CLASS = "class"
    SIGNATURE = "signature"
    CATEGORY = "category"


class ExportWhat(enum.StrEnum):
    RUNS = "runs"
    FAILURES = "failures"


class LabelCategory(enum.StrEnum):
    """What an outside witness may say killed a run."""

    OOM = "oom"
    WALLTIME = "walltime"
    RETIRED = "retired"
    KILLED_WORKER = "killed_worker"


class SweepPolicy(enum.StrEnum):
    """What a sweep does when a cell fails after its retries (SPEC §8)."""

    FAIL_FAST = "fail_fast"
    CONTINUE_ON_FAILURE = "continue_on_failure"


class RetryOn(enum.StrEnum):
    """Which failures are tried again: those diagnosed retryable, or any."""

    RETRYABLE = "retryable"
    ANY = "any"


class SweepStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
