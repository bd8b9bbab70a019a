"""One handler per operation, `handle_<verb>(ctx, peer, request)`, and the dispatch table.

A handler returns an awaitable reply. Mutations are queued on the registry's
group-commit writer synchronously, before the handler yields, so the mutations of
one connection are applied in the order they arrived.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from runnerd import __version__
from runnerd.config import Config
from runnerd.events import Broker
from runnerd.indexer import Indexer
from runnerd.maintenance import prune
from runnerd.processes import is_alive
from runnerd.registry import Registry, Store
from runnerd.resources import Sampler
from runnerd.states import Event, end_with_failure, failure_record, transition
from runnerd_client import paths
from runnerd_client.ids import is_valid_run_id
from runnerd_client.protocol import (
    PROTOCOL_VERSION,
    Artifact,
    Attach,
    Cancel,
    Checkpoint,
    Create,
    Detach,
    ErrorCode,
    Export,
    Fail,
    FailReason,
    Failures,
    Get,
    Heartbeat,
    ListRuns,
    Mutation,
    Prune,
    Request,
    RunnerdError,
    Start,
    State,
    Status,
    Succeed,
    Unwatch,
    Watch,
)

Reply = dict[str, Any]
MAX_NAME = 256
MAX_LIST = 10_000


@dataclass(frozen=True, slots=True)
class Peer:
    """A connected process, as the kernel tells it (SO_PEERCRED), never as it claims."""

    pid: int
    uid: int
    start_time: int | None

    @property
    def source(self) -> str:
        return f"client:{self.pid}"


@dataclass
class Context:
    """What handlers share: settings, the registry and the daemon's runtime facts."""

    config: Config
    registry: Registry
    indexer: Indexer
    broker: Broker
    started_at: float
    sampler: Sampler | None = None
    connections: int = 0


def _event_time(at: float | None) -> float:
    """The client's time of the event (kept when replayed from a spool), never in the future."""
    now = time.time()
    return now if at is None or at <= 0 or at > now else float(at)


def _bad(message: str) -> RunnerdError:
    return RunnerdError(ErrorCode.BAD_REQUEST, message)


MAX_DEPTH = 64


def _depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply lists and maps nest, counted only up to just past `limit`."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def _json(value: Any, what: str) -> str:
    if _depth(value) > MAX_DEPTH:
        raise _bad(f"{what} nests deeper than {MAX_DEPTH} levels")
    try:
        return json.dumps(value if value is not None else {}, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _bad(f"{what} must be JSON-able and not too deeply nested: {exc}") from None


def _mutate(ctx: Context, req: Mutation,
            apply: Callable[[Store, float], Reply]) -> Awaitable[Reply]:
    """Queue an idempotent mutation: a replayed key answers the first reply, changes nothing."""
    at = _event_time(req.at)

    def op(store: Store) -> Reply:
        first = store.replayed(req.key, req.op, req.run_id)
        if first is not None:
            return first
        reply = apply(store, at)
        store.remember(req.key, req.op, req.run_id, reply, at)
        return reply

    return ctx.registry.submit(op)


# --- mutations --------------------------------------------------------------


def _check_create(req: Create) -> None:
    if not is_valid_run_id(req.run_id):
        raise _bad("run_id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    for name, text in (("experiment", req.experiment), ("variation", req.variation)):
        if not text or len(text) > MAX_NAME:
            raise _bad(f"{name} must be 1-{MAX_NAME} characters")
    for name, path in (("run_dir", req.run_dir), ("cwd", req.cwd)):
        if path is not None and (not os.path.isabs(path) or "\0" in path):
            raise _bad(f"{name} must be an absolute path")
    if req.retry_of is not None and not is_valid_run_id(req.retry_of):
        raise _bad("retry_of must be a run id")


def handle_create(ctx: Context, peer: Peer, req: Create) -> Awaitable[Reply]:
    _check_create(req)
    params, tags = _json(req.params, "params"), _json(req.tags, "tags")
    launch = _json(req.launch, "launch") if req.launch is not None else None
    run_dir = os.path.normpath(req.run_dir) if req.run_dir else str(
        paths.default_run_dir(req.run_id))

    def apply(store: Store, at: float) -> Reply:
        if store.run_row(req.run_id) is not None:
            raise RunnerdError(ErrorCode.CONFLICT, f"run {req.run_id} already exists")
        attempt = store.next_attempt(req.experiment, req.variation)
        store.insert_run({
            "run_id": req.run_id, "experiment": req.experiment, "variation": req.variation,
            "attempt": attempt, "state": State.PENDING.value, "params": params, "tags": tags,
            "cwd": req.cwd, "run_dir": run_dir, "host": req.host, "created_at": at,
            "retry_of": req.retry_of, "launch": launch,
        })
        store.record_creation(req.run_id, at, peer.source)
        store.add_pid(req.run_id, peer.pid, peer.start_time, at)
        return {"run_id": req.run_id, "attempt": attempt, "run_dir": run_dir,
                "state": State.PENDING.value}

    return _mutate(ctx, req, apply)


def _positive(name: str, value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise _bad(f"{name} must be positive")
    return value


def handle_start(ctx: Context, peer: Peer, req: Start) -> Awaitable[Reply]:
    for name in ("heartbeat_timeout", "lost_grace", "deadline"):
        _positive(name, getattr(req, name))

    def apply(store: Store, at: float) -> Reply:
        row = store.require_run(req.run_id)
        # A limit the request does not name keeps the run's own (set by an earlier start).
        timeout = req.heartbeat_timeout or row["heartbeat_timeout"] or ctx.config.heartbeat_timeout
        grace = req.lost_grace or row["lost_grace"] or ctx.config.lost_grace
        deadline = req.deadline or row["deadline"]
        state = transition(
            store, row, Event.START, at, peer.source, started_at=row["started_at"] or at,
            last_heartbeat_at=at, heartbeat_timeout=timeout, lost_grace=grace, deadline=deadline,
        )
        store.add_pid(req.run_id, peer.pid, peer.start_time, at)
        return {"state": state.value, "attempt": row["attempt"]}

    return _mutate(ctx, req, apply)


def handle_attach(ctx: Context, peer: Peer, req: Attach) -> Awaitable[Reply]:
    def apply(store: Store, at: float) -> Reply:
        row = store.require_run(req.run_id)
        # Back from lost is a sign of life: the watchdog counts the heartbeat timeout from now.
        alive = {"last_heartbeat_at": max(at, row["last_heartbeat_at"] or 0.0)} \
            if row["state"] == State.LOST else {}
        transition(store, row, Event.ATTACH, at, peer.source, **alive)
        store.add_pid(req.run_id, peer.pid, peer.start_time, at)
        return {"run": store.run_object(store.require_run(req.run_id))}

    return _mutate(ctx, req, apply)


def handle_detach(ctx: Context, peer: Peer, req: Detach) -> Awaitable[Reply]:
    def apply(store: Store, at: float) -> Reply:
        store.require_run(req.run_id)
        store.remove_pid(req.run_id, peer.pid)
        return {}

    return _mutate(ctx, req, apply)


def handle_heartbeat(ctx: Context, peer: Peer, req: Heartbeat) -> Awaitable[Reply]:
    """A heartbeat is applied once per `seq`: an older or equal seq is a replay."""
    if req.seq < 1:
        raise _bad("seq must count from 1")
    at = _event_time(req.at)

    def op(store: Store) -> Reply:
        if store.heartbeat_running(req.run_id, req.seq, at):
            return {"state": State.RUNNING.value}
        row = store.require_run(req.run_id)
        if req.seq <= row["heartbeat_seq"]:
            return {"state": row["state"]}
        state = transition(
            store, row, Event.HEARTBEAT, at, peer.source, heartbeat_seq=req.seq,
            heartbeats=row["heartbeats"] + 1,
            last_heartbeat_at=max(at, row["last_heartbeat_at"] or 0.0),
        )
        return {"state": state.value}

    return ctx.registry.submit(op)


def handle_succeed(ctx: Context, peer: Peer, req: Succeed) -> Awaitable[Reply]:
    def apply(store: Store, at: float) -> Reply:
        row = store.require_run(req.run_id)
        state = transition(store, row, Event.SUCCEED, at, peer.source, ended_at=at)
        return {"state": state.value}

    return _mutate(ctx, req, apply)


_FAIL_EVENTS = {
    FailReason.CRASH: (Event.FAIL_CRASH, "Error"),
    FailReason.ABANDONED: (Event.FAIL_ABANDONED, "Abandoned"),
    FailReason.TIMEOUT: (Event.FAIL_TIMEOUT, "Timeout"),
}


def handle_fail(ctx: Context, peer: Peer, req: Fail) -> Awaitable[Reply]:
    if req.reason not in _FAIL_EVENTS:
        raise _bad(f"reason must be one of {', '.join(_FAIL_EVENTS)}")
    event, default_class = _FAIL_EVENTS[FailReason(req.reason)]
    message = req.message or ""
    if req.category_hint == "oom" and ctx.sampler is not None and "peak" not in message:
        peak = ctx.sampler.peak_text(req.run_id)
        message = f"{message}: {peak}" if peak else message

    def apply(store: Store, at: float) -> Reply:
        row = store.require_run(req.run_id)
        record = failure_record(
            req.failure_class or default_class, message, req.reason, at,
            category_hint=req.category_hint, traceback=req.traceback, phase=req.phase,
            exit_code=req.exit_code, signal=req.signal,
        )
        state = end_with_failure(store, row, event, record, peer.source)
        return {"state": state.value, "category": record["category"],
                "retryable": record["retryable"]}

    return _mutate(ctx, req, apply)


SIGNALS = {name: getattr(signal, f"SIG{name}")
           for name in ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2")}


async def handle_cancel(ctx: Context, peer: Peer, req: Cancel) -> Reply:
    """Mark the run abandoned; then signal its live processes, once (not on a replay)."""
    signum = SIGNALS.get((req.signal or "").upper().removeprefix("SIG")) if req.signal else None
    if req.signal and signum is None:
        raise _bad(f"signal must be one of {', '.join(SIGNALS)}")
    targets: list[tuple[int, int | None]] = []

    def apply(store: Store, at: float) -> Reply:
        row = store.require_run(req.run_id)
        record = failure_record("Cancelled", req.message or "cancelled by the user",
                                FailReason.ABANDONED, at)
        state = end_with_failure(store, row, Event.CANCEL, record, "cancel")
        targets.extend(store.pid_records(req.run_id))
        return {"state": state.value}

    reply = await _mutate(ctx, req, apply)
    if signum is not None:
        reply = {**reply, "signalled": [pid for pid, start in targets
                                        if is_alive(pid, start) and _kill(pid, signum)]}
    return reply


def _kill(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except OSError:
        return False
    return True


def handle_checkpoint(ctx: Context, peer: Peer, req: Checkpoint) -> Awaitable[Reply]:
    data = _json(req.data, "data")

    def apply(store: Store, at: float) -> Reply:
        row = store.require_run(req.run_id)
        if State(row["state"]).terminal:
            raise RunnerdError(ErrorCode.INVALID_TRANSITION,
                               f"cannot checkpoint a run that is {row['state']}")
        return {"seq": store.add_checkpoint(req.run_id, data, req.path, at)}

    return _mutate(ctx, req, apply)


def file_digest(path: str) -> tuple[int, str]:
    """Size and sha256 of a regular file; a clear error for anything else."""
    if not os.path.isabs(path) or "\0" in path:
        raise _bad(f"artifact path must be absolute: {path!r}")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (a no-op for regular files).
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY), "rb") as fh:
            info = os.fstat(fh.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise _bad(f"artifact {path} is a directory, not a file")
            if not stat.S_ISREG(info.st_mode):
                raise _bad(f"artifact {path} is not a regular file")
            digest = hashlib.file_digest(fh, "sha256")
    except FileNotFoundError:
        raise _bad(f"artifact {path} does not exist") from None
    except IsADirectoryError:
        raise _bad(f"artifact {path} is a directory, not a file") from None
    except OSError as exc:
        raise _bad(f"artifact {path} cannot be read: {exc.strerror}") from None
    return info.st_size, digest.hexdigest()


async def handle_artifact(ctx: Context, peer: Peer, req: Artifact) -> Reply:
    """Hash the file off the event loop, then record it."""
    digest = await anyio.to_thread.run_sync(file_digest, req.path)
    return await record_artifact(ctx, req, digest)


def record_artifact(ctx: Context, req: Artifact, digest: tuple[int, str]) -> Awaitable[Reply]:
    """Queue the record of an artifact whose size and sha256 are known."""
    size, sha256 = digest
    path = os.path.normpath(req.path)

    def apply(store: Store, at: float) -> Reply:
        store.require_run(req.run_id)
        store.put_artifact(req.run_id, path, size, sha256, at)
        return {"path": path, "size": size, "sha256": sha256}

    return _mutate(ctx, req, apply)


# --- reads ------------------------------------------------------------------


async def handle_get(ctx: Context, peer: Peer, req: Get) -> Reply:
    return {"run": await ctx.registry.read(lambda s: s.run_details(s.resolve(req.run)))}


async def handle_list(ctx: Context, peer: Peer, req: ListRuns) -> Reply:
    if req.state is not None and req.state not in State.__members__.values():
        raise _bad(f"unknown state {req.state!r}")
    if not 1 <= req.limit <= MAX_LIST:
        raise _bad(f"limit must be between 1 and {MAX_LIST}")
    runs = await ctx.registry.read(lambda s: s.list_runs(
        state=req.state, experiment=req.experiment, since=req.since, limit=req.limit))
    return {"runs": runs}


async def handle_status(ctx: Context, peer: Peer, req: Status) -> Reply:
    limit = max(1, min(req.limit, 100))

    def read(store: Store) -> Reply:
        return {"counts": store.counts(), "active": store.active_runs(limit),
                "failures": store.failures(limit=limit)}

    body = await ctx.registry.read(read)
    body["daemon"] = {
        "version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
        "uptime_sec": round(time.time() - ctx.started_at, 3), "socket": str(ctx.config.socket),
        "db": str(ctx.config.db), "db_bytes": _db_size(ctx.config.db),
        "clients": ctx.connections,
    }
    return body


GROUP_KEYS = {"class": "failure_class", "signature": "signature", "category": "category"}


async def handle_failures(ctx: Context, peer: Peer, req: Failures) -> Reply:
    if req.group_by is not None and req.group_by not in GROUP_KEYS:
        raise _bad(f"group_by must be one of {', '.join(GROUP_KEYS)}")
    if not 1 <= req.limit <= MAX_LIST:
        raise _bad(f"limit must be between 1 and {MAX_LIST}")
    if req.group_by is None:
        def read(store: Store) -> Reply:
            run_id = store.resolve(req.run) if req.run else None
            return {"failures": store.failures(since=req.since, experiment=req.experiment,
                                               run_id=run_id, limit=req.limit)}
        return await ctx.registry.read(read)
    key = GROUP_KEYS[req.group_by]
    return {"groups": await ctx.registry.read(lambda s: s.failure_groups(
        key, since=req.since, experiment=req.experiment, limit=req.limit))}


async def handle_export(ctx: Context, peer: Peer, req: Export) -> Reply:
    if req.what not in ("runs", "failures"):
        raise _bad("what must be 'runs' or 'failures'")
    if not 1 <= req.limit <= MAX_LIST:
        raise _bad(f"limit must be between 1 and {MAX_LIST}")
    items = await ctx.registry.read(lambda s: s.export_page(req.what, req.after, req.limit))
    return {"items": items, "next": items[-1]["run_id"] if len(items) == req.limit else None}


def _folder(path: str) -> str:
    if not os.path.isabs(path) or "\0" in path:
        raise _bad(f"path must be absolute: {path!r}")
    return os.path.normpath(path)


async def handle_watch(ctx: Context, peer: Peer, req: Watch) -> Reply:
    folder = _folder(req.path)
    if not os.path.isdir(folder):
        raise _bad(f"{folder} is not a directory")
    return (await ctx.indexer.add(folder)).as_reply()


async def handle_unwatch(ctx: Context, peer: Peer, req: Unwatch) -> Reply:
    folder = _folder(req.path)
    if not await ctx.indexer.remove(folder):
        raise _bad(f"{folder} is not watched")
    return {}


async def handle_prune(ctx: Context, peer: Peer, req: Prune) -> Reply:
    states = tuple(req.states or ())
    known = [s.value for s in State if s.terminal]
    if any(state not in known for state in states):
        raise _bad(f"states must be terminal states: {', '.join(known)}")
    run_ids = await prune(ctx.registry, req.before, states, req.dry_run)
    return {"count": len(run_ids), "run_ids": run_ids[:100], "dry_run": req.dry_run}


def _db_size(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


Handler = Callable[[Context, Peer, Any], Awaitable[Reply]]
HANDLERS: dict[type[Request], Handler] = {
    Create: handle_create,
    Start: handle_start,
    Attach: handle_attach,
    Detach: handle_detach,
    Heartbeat: handle_heartbeat,
    Succeed: handle_succeed,
    Fail: handle_fail,
    Cancel: handle_cancel,
    Checkpoint: handle_checkpoint,
    Artifact: handle_artifact,
    Get: handle_get,
    ListRuns: handle_list,
    Status: handle_status,
    Failures: handle_failures,
    Export: handle_export,
    Watch: handle_watch,
    Unwatch: handle_unwatch,
    Prune: handle_prune,
}
