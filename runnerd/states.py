"""The run state machine (SPEC §2): one table, and the one way to apply an event to a run."""

from __future__ import annotations

import enum
from dataclasses import replace
from typing import TYPE_CHECKING

from runnerd.diagnosis import diagnose, relabel
from runnerd.failures import signature
from runnerd.registry.rows import NO_CHANGE, FailureRecord, RunRow, RunUpdate
from runnerd_client.protocol import ErrorCode, RunnerdError, State

if TYPE_CHECKING:
    from runnerd.registry import Store


class Event(enum.StrEnum):
    """What can happen to a run, from a client or from the daemon itself."""

    START = "start"
    ATTACH = "attach"
    HEARTBEAT = "heartbeat"
    SUCCEED = "succeed"
    FAIL_CRASH = "fail_crash"
    FAIL_ABANDONED = "fail_abandoned"
    FAIL_TIMEOUT = "fail_timeout"
    CANCEL = "cancel"
    HEARTBEAT_MISSED = "heartbeat_missed"
    GRACE_EXPIRED = "grace_expired"
    DEADLINE = "deadline"
    PROCESS_EXITED = "process_exited"
    INTERRUPTED = "interrupted"


P, R, L = State.PENDING, State.RUNNING, State.LOST

TRANSITIONS: dict[Event, dict[State, State]] = {
    Event.START: {P: R, L: R},
    Event.ATTACH: {P: P, R: R, L: R},
    Event.HEARTBEAT: {R: R, L: R},
    Event.SUCCEED: {R: State.SUCCEEDED, L: State.SUCCEEDED},
    Event.FAIL_CRASH: {P: State.FAILED_CRASH, R: State.FAILED_CRASH, L: State.FAILED_CRASH},
    Event.FAIL_ABANDONED: {
        P: State.FAILED_ABANDONED,
        R: State.FAILED_ABANDONED,
        L: State.FAILED_ABANDONED,
    },
    Event.FAIL_TIMEOUT: {P: State.FAILED_TIMEOUT, R: State.FAILED_TIMEOUT, L: State.FAILED_TIMEOUT},
    Event.CANCEL: {P: State.FAILED_ABANDONED, R: State.FAILED_ABANDONED, L: State.FAILED_ABANDONED},
    Event.HEARTBEAT_MISSED: {R: L},
    Event.GRACE_EXPIRED: {L: State.FAILED_LOST},
    Event.DEADLINE: {R: State.FAILED_TIMEOUT, L: State.FAILED_TIMEOUT},
    Event.PROCESS_EXITED: {P: State.FAILED_CRASH, R: State.FAILED_CRASH, L: State.FAILED_CRASH},
    Event.INTERRUPTED: {
        P: State.FAILED_ABANDONED,
        R: State.FAILED_ABANDONED,
        L: State.FAILED_ABANDONED,
    },
}


def next_state(event: Event, current: State) -> State:
    """The state `event` leads to from `current`, or an invalid_transition error."""
    target = TRANSITIONS[event].get(current)
    if target is None:
        raise RunnerdError(
            ErrorCode.INVALID_TRANSITION, f"cannot {event.value} a run that is {current.value}"
        )
    return target


def transition(
    store: Store,
    row: RunRow,
    event: Event,
    at: float,
    source: str,
    *,
    cause: str | None = None,
    change: RunUpdate = NO_CHANGE,
) -> State:
    """Apply `event` to a run through the table, recording it if the state changes (with
    `cause`, when the caller knows better than the event's name why)."""
    target = next_state(event, row.state)
    if target != row.state:
        store.runs.set_state(
            row, target, at=at, cause=cause or event.value, source=source, change=change
        )
    elif change != NO_CHANGE:
        store.runs.update(row.run_id, change)
    return target


INFERRED = frozenset({"reconciler", "watchdog"})
"""Sources of endings the daemon inferred (a death, a silence, a deadline) rather than heard."""


def inferred_end_after(store: Store, row: RunRow, at: float) -> State | None:
    """The state the run was in before the daemon inferred its end, if that end came after
    `at` (a client's event, spooled and replayed late); else None."""
    if not row.state.terminal or row.ended_at is None or at > row.ended_at:
        return None
    last = store.runs.last_transition(row.run_id)
    if last is None or last[0] is None or last[1] not in INFERRED:
        return None
    return State(last[0])


def before_inferred_end(store: Store, row: RunRow, at: float) -> RunRow:
    """The run as it was before the daemon inferred its end, if the client's own ending
    (at `at`) came first: what a client reported before it died (spooled, and replayed
    late) wins over what the daemon guessed meanwhile. Otherwise `row` as it is."""
    earlier = inferred_end_after(store, row, at)
    if earlier is None:
        return row
    store.failures.drop(row.run_id)
    return replace(row, state=earlier)


def failure_record(
    failure_class: str,
    message: str,
    reason: str,
    at: float,
    category_hint: str | None = None,
    *,
    traceback: str | None = None,
    phase: str | None = None,
    exit_code: int | None = None,
    signal: str | None = None,
) -> FailureRecord:
    """A failure record of SPEC §3, with its signature and its diagnosis.

    `category_hint="oom"` comes from whoever saw the kernel's OOM killer at work.
    """
    found = diagnose(
        {
            "failure_class": failure_class,
            "message": message,
            "reason": reason,
            "at": at,
            "traceback": traceback,
            "phase": phase,
            "exit_code": exit_code,
            "signal": signal,
        },
        category_hint,
    )
    return FailureRecord(
        failure_class=failure_class,
        message=message,
        reason=reason,
        at=at,
        signature=signature(failure_class, message, traceback),
        category=found.category,
        retryable=found.retryable,
        traceback=traceback,
        phase=phase,
        exit_code=exit_code,
        signal=signal,
    )


def relabelled(record: FailureRecord, category: str, note: str | None) -> FailureRecord:
    """A failure record re-diagnosed with what an outside witness says killed the run (the
    witness's note is part of what the diagnosis reads)."""
    message, found = relabel(record.as_dict(), category, note)
    return replace(record, message=message, category=found.category, retryable=found.retryable)


def end_with_failure(
    store: Store,
    row: RunRow,
    event: Event,
    record: FailureRecord,
    source: str,
    cause: str | None = None,
) -> State:
    """End a run in the failed state `event` leads to, with its failure record (recorded
    first, so its event precedes the terminal transition in the event log)."""
    next_state(event, row.state)
    label = store.failures.label(row.run_id)
    if label is not None:
        record = relabelled(record, *label)
    store.failures.put(row.run_id, record)
    return transition(
        store, row, event, record.at, source, cause=cause, change=RunUpdate(ended_at=record.at)
    )
