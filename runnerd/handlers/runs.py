"""The verbs of a run's life: create, start, attach, detach, heartbeat, succeed, fail,
cancel, and label (what an outside witness says killed it)."""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Awaitable

from runnerd.handlers.claims import followed, recorded_variation
from runnerd.handlers.common import as_json, bad, event_time, mutate
from runnerd.handlers.context import Context, Peer, Reply
from runnerd.processes import is_alive
from runnerd.registry import NO_CHANGE, NewRun, RunUpdate, Store
from runnerd.states import (
    Event,
    before_inferred_end,
    end_with_failure,
    failure_record,
    inferred_end_after,
    relabelled,
    transition,
)
from runnerd_client import paths
from runnerd_client.fields import MAX_NAME
from runnerd_client.protocol import (
    Attach,
    Cancel,
    Create,
    Detach,
    ErrorCode,
    Fail,
    FailReason,
    Heartbeat,
    Label,
    RunnerdError,
    Start,
    State,
    Succeed,
)


def _check_create(req: Create) -> None:
    """What a field alone cannot say (the protocol checks each field)."""
    if (req.sweep_id is None) != (req.cell is None):
        raise bad("sweep_id and cell go together")
    if req.replicates and req.sweep_id is None:
        raise bad("replicates needs the sweep_id and cell it replicates")


def handle_create(ctx: Context, peer: Peer, req: Create) -> Awaitable[Reply]:
    _check_create(req)
    params, tags = as_json(req.params, "params"), as_json(req.tags, "tags")
    launch = as_json(req.launch, "launch") if req.launch is not None else None
    launch_env = as_json(req.launch_env, "launch_env") if req.launch_env is not None else None
    run_dir = os.path.normpath(req.run_dir) if req.run_dir else _default_run_dir(req.run_id)

    def apply(store: Store, at: float) -> Reply:
        if store.runs.get(req.run_id) is not None:
            raise RunnerdError(ErrorCode.CONFLICT, f"run {req.run_id} already exists")
        resumed = followed(store, req, at)
        attempt = store.runs.create(
            NewRun(
                run_id=req.run_id,
                experiment=req.experiment,
                variation=recorded_variation(store, req),
                params_json=params,
                tags_json=tags,
                cwd=req.cwd,
                run_dir=run_dir,
                host=req.host,
                created_at=at,
                retry_of=req.retry_of,
                launch_json=launch,
                sweep_id=req.sweep_id,
                cell=req.cell,
                resumed_from=resumed.run_id if resumed else None,
                claim_token=req.claim_token,
            ),
            peer.source,
        )
        if launch_env is not None:
            store.runs.set_launch_env(req.run_id, launch_env)
        if req.sweep_id is not None and req.cell is not None and not req.replicates:
            store.sweeps.claim_cell(req.sweep_id, req.cell, req.run_id)
        store.attachments.add_pid(req.run_id, peer.pid, peer.start_time, at)
        reply: Reply = {
            "run_id": req.run_id,
            "attempt": attempt,
            "run_dir": run_dir,
            "state": State.PENDING.value,
        }
        if resumed is not None:
            reply["resumed_from"] = resumed.run_id
            reply["resume_checkpoint"] = store.attachments.resume_checkpoint(resumed.run_id)
        return reply

    return mutate(ctx, req, apply)


def _default_run_dir(run_id: str) -> str:
    """`paths.default_run_dir` as text. Its folder is worked out once for each value of
    the variables it depends on: pathlib cost a create more than the rest of its handling,
    and a run id is one plain path component (its pattern has no '/' and no '.')."""
    env = os.environ
    return f"{_runs_folder(env.get('XDG_DATA_HOME'), env.get('HOME'))}/{run_id}"


@functools.lru_cache(maxsize=4)
def _runs_folder(xdg_data_home: str | None, home: str | None) -> str:
    """The folder of default run folders while $XDG_DATA_HOME and $HOME are these."""
    return str(paths.default_run_dir("run").parent)


def handle_start(ctx: Context, peer: Peer, req: Start) -> Awaitable[Reply]:

    def apply(store: Store, at: float) -> Reply:
        row = store.runs.require(req.run_id)
        if req.stall_timeout is not None:
            store.runs.set_stall_timeout(req.run_id, req.stall_timeout)
        # A limit the request does not name keeps the run's own (set by an earlier start).
        timeout = req.heartbeat_timeout or row.heartbeat_timeout or ctx.config.heartbeat_timeout
        grace = req.lost_grace or row.lost_grace or ctx.config.lost_grace
        deadline = req.deadline or row.deadline
        state = transition(
            store,
            row,
            Event.START,
            at,
            peer.source,
            change=RunUpdate(
                started_at=row.started_at or at,
                last_heartbeat_at=at,
                heartbeat_timeout=timeout,
                lost_grace=grace,
                deadline=deadline,
            ),
        )
        store.attachments.add_pid(req.run_id, peer.pid, peer.start_time, at)
        return {"state": state.value, "attempt": row.attempt}

    return mutate(ctx, req, apply)


def handle_attach(ctx: Context, peer: Peer, req: Attach) -> Awaitable[Reply]:
    def apply(store: Store, at: float) -> Reply:
        row = store.runs.require(req.run_id)
        # Back from lost is a sign of life: the watchdog counts the heartbeat timeout from now.
        alive = (
            RunUpdate(last_heartbeat_at=max(at, row.last_heartbeat_at or 0.0))
            if row.state == State.LOST
            else NO_CHANGE
        )
        transition(store, row, Event.ATTACH, at, peer.source, change=alive)
        store.attachments.add_pid(req.run_id, peer.pid, peer.start_time, at)
        run = store.views.run_object(store.runs.require(req.run_id))
        resumed = run.resumed_from
        return {
            "run": run,
            "resume_checkpoint": store.attachments.resume_checkpoint(resumed) if resumed else None,
        }

    return mutate(ctx, req, apply)


def handle_detach(ctx: Context, peer: Peer, req: Detach) -> Awaitable[Reply]:
    def apply(store: Store, at: float) -> Reply:
        store.runs.require(req.run_id)
        store.attachments.remove_pid(req.run_id, peer.pid)
        return {}

    return mutate(ctx, req, apply)


def handle_heartbeat(ctx: Context, peer: Peer, req: Heartbeat) -> Awaitable[Reply]:
    """A heartbeat is applied once per `seq`. Seqs skipped by a later one are remembered:
    one of them arriving late (its write failed on a full disk and it was spooled, say) is
    counted then; any other older or equal seq is a replay."""
    at = event_time(req.at)
    if req.progress is not False and ctx.sampler is not None:  # sent on purpose: it moved
        ctx.sampler.heartbeat(req.run_id, at)

    def op(store: Store) -> Reply:
        if store.runs.heartbeat_running(req.run_id, req.seq, at):
            return {"state": State.RUNNING.value}
        row = store.runs.require(req.run_id)
        heartbeats = row.heartbeats + 1
        last = max(at, row.last_heartbeat_at or 0.0)
        if req.seq <= row.heartbeat_seq:
            if store.runs.fill_heartbeat_gap(req.run_id, req.seq):
                store.runs.update(
                    req.run_id, RunUpdate(heartbeats=heartbeats, last_heartbeat_at=last)
                )
            return {"state": row.state.value}
        store.runs.note_heartbeat_gap(req.run_id, row.heartbeat_seq, req.seq)
        counted = RunUpdate(heartbeat_seq=req.seq, heartbeats=heartbeats, last_heartbeat_at=last)
        if inferred_end_after(store, row, at) is not None or (  # spooled, from before that end
            req.progress is False
            and row.state is State.LOST
            and store.runs.last_cause(req.run_id) == "stalled"
        ):  # alive is not moving
            store.runs.update(req.run_id, counted)
            return {"state": row.state.value}
        state = transition(store, row, Event.HEARTBEAT, at, peer.source, change=counted)
        return {"state": state.value}

    return ctx.registry.submit(op)


def handle_succeed(ctx: Context, peer: Peer, req: Succeed) -> Awaitable[Reply]:
    def apply(store: Store, at: float) -> Reply:
        row = before_inferred_end(store, store.runs.require(req.run_id), at)
        state = transition(
            store, row, Event.SUCCEED, at, peer.source, change=RunUpdate(ended_at=at)
        )
        return {"state": state.value}

    return mutate(ctx, req, apply)


_FAIL_EVENTS = {
    FailReason.CRASH: (Event.FAIL_CRASH, "Error"),
    FailReason.ABANDONED: (Event.FAIL_ABANDONED, "Abandoned"),
    FailReason.TIMEOUT: (Event.FAIL_TIMEOUT, "Timeout"),
}


def handle_fail(ctx: Context, peer: Peer, req: Fail) -> Awaitable[Reply]:
    event, default_class = _FAIL_EVENTS[FailReason(req.reason)]
    message = req.message or ""
    if req.category_hint == "oom" and ctx.sampler is not None and "peak" not in message:
        peak = ctx.sampler.peak_text(req.run_id)
        message = f"{message}: {peak}" if peak else message

    def apply(store: Store, at: float) -> Reply:
        row = before_inferred_end(store, store.runs.require(req.run_id), at)
        record = failure_record(
            req.failure_class or default_class,
            message,
            req.reason,
            at,
            category_hint=req.category_hint,
            traceback=req.traceback,
            phase=req.phase,
            exit_code=req.exit_code,
            signal=req.signal,
        )
        state = end_with_failure(store, row, event, record, peer.source, cause=req.cause)
        return {"state": state.value, "category": record.category, "retryable": record.retryable}

    return mutate(ctx, req, apply)


SIGNALS = {
    name: getattr(signal, f"SIG{name}")
    for name in ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2")
}


async def handle_cancel(ctx: Context, peer: Peer, req: Cancel) -> Reply:
    """Mark the run abandoned; then signal its live processes, once (not on a replay)."""
    signum = SIGNALS.get((req.signal or "").upper().removeprefix("SIG")) if req.signal else None
    if req.signal and signum is None:
        raise bad(f"signal must be one of {', '.join(SIGNALS)}")
    targets: list[tuple[int, int | None]] = []

    def apply(store: Store, at: float) -> Reply:
        row = store.runs.require(req.run_id)
        record = failure_record(
            "Cancelled", req.message or "cancelled by the user", FailReason.ABANDONED, at
        )
        state = end_with_failure(store, row, Event.CANCEL, record, "cancel")
        targets.extend(store.attachments.pid_records(req.run_id))
        return {"state": state.value}

    reply = await mutate(ctx, req, apply)
    if signum is not None:
        reply = {
            **reply,
            "signalled": [
                pid for pid, start in targets if is_alive(pid, start) and _kill(pid, signum)
            ],
        }
    return reply


def _kill(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except OSError:
        return False
    return True


def handle_label(ctx: Context, peer: Peer, req: Label) -> Awaitable[Reply]:
    """Keep what killed a run; a failed run is re-diagnosed now, an active one when it
    fails (the witness may speak before the daemon has seen the death)."""
    note = (req.note or "")[:MAX_NAME] or None

    def apply(store: Store, at: float) -> Reply:
        row = store.runs.require(req.run_id)
        store.failures.put_label(req.run_id, req.category, note, at)
        failure = store.failures.get(req.run_id) if row.failed else None
        if failure is None:
            return {"state": row.state.value, "applied": False}
        record = relabelled(failure, req.category, note)
        store.failures.put(req.run_id, record)
        return {
            "state": row.state.value,
            "applied": True,
            "category": record.category,
            "retryable": bool(record.retryable),
        }

    return mutate(ctx, req, apply)
