"""One handler per operation, `handle_<verb>(ctx, peer, request)`, and the dispatch table.

A handler returns an awaitable reply. Mutations are queued on the registry's
group-commit writer synchronously, before the handler yields, so the mutations of
one connection are applied in the order they arrived.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from runnerd import __version__, sweeps
from runnerd.config import ARTIFACT_TIMEOUT, Config
from runnerd.events import Broker
from runnerd.hooks import HookRunner, handle_hooks
from runnerd.indexer import Indexer
from runnerd.maintenance import prune
from runnerd.processes import is_alive
from runnerd.registry import NO_CHANGE, NewRun, NewSweep, Registry, RunRow, RunUpdate, Store
from runnerd.resources import Sampler
from runnerd.states import (
    Event,
    before_inferred_end,
    end_with_failure,
    failure_record,
    inferred_end_after,
    relabelled,
    transition,
)
from runnerd.sweeps import ManifestWriter
from runnerd_client import paths
from runnerd_client.cells import SpecError, changed_keys, count, expand, variation
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
    HookList,
    Label,
    ListRuns,
    Mutation,
    Prune,
    Request,
    RunnerdError,
    Start,
    State,
    Status,
    Succeed,
    SweepCells,
    SweepCreate,
    SweepEnd,
    SweepGet,
    SweepList,
    SweepMutation,
    SweepPolicy,
    SweepStart,
    SweepStatus,
    Unwatch,
    Watch,
    request_map,
)
from runnerd_client.replies import (
    CellInfo,
    DaemonInfo,
    ListedFailure,
    RunInfo,
    StatusInfo,
    SweepInfo,
    fields_of,
)

Reply = dict[str, Any]
MAX_NAME = 256
MAX_LIST = 10_000
MAX_CELLS = 1_000_000


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
    manifests: ManifestWriter
    started_at: float
    sampler: Sampler | None = None
    connections: int = 0
    spooled_artifacts: MemoryObjectSendStream[Artifact] | None = None
    """Where replayed artifacts go to be hashed in the background (a spooled 6 GiB file must
    not hold up start-up); None: hashed in line."""
    hooks: HookRunner | None = None


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


def _payload_digest(req: Mutation | SweepMutation) -> str:
    """What an idempotency key stands for: every field of the request but the key itself and
    the event's time (a spooled event is replayed with the time it happened)."""
    payload = {k: v for k, v in request_map(req).items() if k not in ("key", "at")}
    try:
        text = json.dumps(payload, sort_keys=True, default=repr, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        raise _bad(f"{req.op}: fields must be JSON-able and not too deeply nested") from None
    return hashlib.sha256(text.encode()).hexdigest()


def _mutate(ctx: Context, req: Mutation | SweepMutation,
            apply: Callable[[Store, float], Reply]) -> Awaitable[Reply]:
    """Queue an idempotent mutation: a replayed key answers the first reply, changes nothing;
    the same key with other fields is a `conflict`."""
    at = _event_time(req.at)
    digest = _payload_digest(req)

    def op(store: Store) -> Reply:
        first = store.upkeep.replayed(req.key, req.op, req.subject, digest)
        if first is not None:
            return first
        reply = apply(store, at)
        store.upkeep.remember(req.key, req.op, req.subject, reply, at, digest)
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
    for name, ref in (("retry_of", req.retry_of), ("claim_after", req.claim_after)):
        if ref is not None and not is_valid_run_id(ref):
            raise _bad(f"{name} must be a run id")
    if (req.sweep_id is None) != (req.cell is None):
        raise _bad("sweep_id and cell go together")


def handle_create(ctx: Context, peer: Peer, req: Create) -> Awaitable[Reply]:
    _check_create(req)
    params, tags = _json(req.params, "params"), _json(req.tags, "tags")
    launch = _json(req.launch, "launch") if req.launch is not None else None
    run_dir = os.path.normpath(req.run_dir) if req.run_dir else str(
        paths.default_run_dir(req.run_id))

    def apply(store: Store, at: float) -> Reply:
        if store.runs.get(req.run_id) is not None:
            raise RunnerdError(ErrorCode.CONFLICT, f"run {req.run_id} already exists")
        previous = _claim_cell(store, req, at) if req.sweep_id is not None else \
            _resumable(store, req, at) if req.resume else None
        resumed = previous if req.resume and previous is not None and \
            previous.state != State.SUCCEEDED else None
        if resumed is not None:
            _same_params(resumed, req.params or {})
        attempt = store.runs.create(NewRun(
            run_id=req.run_id, experiment=req.experiment, variation=req.variation,
            params_json=params, tags_json=tags, cwd=req.cwd, run_dir=run_dir, host=req.host,
            created_at=at, retry_of=req.retry_of, launch_json=launch, sweep_id=req.sweep_id,
            cell=req.cell, resumed_from=resumed.run_id if resumed else None), peer.source)
        if req.sweep_id is not None and req.cell is not None:
            store.sweeps.claim_cell(req.sweep_id, req.cell, req.run_id)
        store.attachments.add_pid(req.run_id, peer.pid, peer.start_time, at)
        reply = {"run_id": req.run_id, "attempt": attempt, "run_dir": run_dir,
                 "state": State.PENDING.value}
        if resumed is not None:
            reply["resumed_from"] = resumed.run_id
            reply["resume_checkpoint"] = store.attachments.resume_checkpoint(resumed.run_id)
        return reply

    return _mutate(ctx, req, apply)


def _claim_cell(store: Store, req: Create, at: float) -> RunRow | None:
    """Check that the cell is the requester's to run (its latest attempt is still the one
    it planned after, and none is live); return that latest attempt's row."""
    assert req.sweep_id is not None and req.cell is not None
    sweep = store.sweeps.require(req.sweep_id)
    cell = store.sweeps.cell(req.sweep_id, req.cell)
    if (sweep.experiment, cell.variation) != (req.experiment, req.variation):
        raise _bad(f"cell {req.cell} of sweep {req.sweep_id} is"
                   f" {sweep.experiment}/{cell.variation}")
    latest = cell.latest_run_id
    row = store.runs.get(latest) if latest else None
    if latest != req.claim_after and not _redispatch(row, req):
        raise RunnerdError(ErrorCode.CONFLICT, f"cell {req.cell} of sweep {req.sweep_id}"
                           f" was claimed meanwhile by run {latest}")
    if row is not None:
        _take_over(store, row, at, f"cell {req.cell} of sweep {req.sweep_id}")
    return row


def _redispatch(latest: RunRow | None, req: Create) -> bool:
    """Whether this attempt is a scheduler running the very same task again (Dask
    re-dispatches a task whose worker died): it follows that task's earlier dispatch."""
    key = (req.tags or {}).get("dask_key")
    return latest is not None and key is not None and \
        latest.tags().get("dask_key") == key


def _resumable(store: Store, req: Create, at: float) -> RunRow | None:
    """The latest attempt of the experiment and variation, which a resume follows."""
    row = store.runs.latest_attempt(req.experiment, req.variation)
    if row is not None:
        _take_over(store, row, at, f"{req.experiment}/{req.variation}")
    return row


def _take_over(store: Store, row: RunRow, at: float, what: str) -> None:
    """A new attempt may not start beside a live one; a lost one is given up for it."""
    if row.state in (State.PENDING, State.RUNNING):
        raise RunnerdError(ErrorCode.CONFLICT, f"{what} is held by live attempt"
                           f" {row.attempt} (run {row.run_id}, {row.state})")
    if row.state == State.LOST:
        record = failure_record("Superseded", "a new attempt took over this lost run",
                                FailReason.ABANDONED, at)
        end_with_failure(store, row, Event.CANCEL, record, "superseded")


def _same_params(previous: RunRow, params: dict[str, Any]) -> None:
    changed = changed_keys(previous.params(), params)
    if changed:
        raise RunnerdError(ErrorCode.CONFLICT, f"cannot resume run {previous.run_id}:"
                           f" params changed: {', '.join(changed)}")


def _positive(name: str, value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise _bad(f"{name} must be positive")
    return value


def handle_start(ctx: Context, peer: Peer, req: Start) -> Awaitable[Reply]:
    for name in ("heartbeat_timeout", "lost_grace", "deadline"):
        _positive(name, getattr(req, name))

    def apply(store: Store, at: float) -> Reply:
        row = store.runs.require(req.run_id)
        # A limit the request does not name keeps the run's own (set by an earlier start).
        timeout = req.heartbeat_timeout or row.heartbeat_timeout or ctx.config.heartbeat_timeout
        grace = req.lost_grace or row.lost_grace or ctx.config.lost_grace
        deadline = req.deadline or row.deadline
        state = transition(store, row, Event.START, at, peer.source, change=RunUpdate(
            started_at=row.started_at or at, last_heartbeat_at=at, heartbeat_timeout=timeout,
            lost_grace=grace, deadline=deadline))
        store.attachments.add_pid(req.run_id, peer.pid, peer.start_time, at)
        return {"state": state.value, "attempt": row.attempt}

    return _mutate(ctx, req, apply)


def handle_attach(ctx: Context, peer: Peer, req: Attach) -> Awaitable[Reply]:
    def apply(store: Store, at: float) -> Reply:
        row = store.runs.require(req.run_id)
        # Back from lost is a sign of life: the watchdog counts the heartbeat timeout from now.
        alive = RunUpdate(last_heartbeat_at=max(at, row.last_heartbeat_at or 0.0)) \
            if row.state == State.LOST else NO_CHANGE
        transition(store, row, Event.ATTACH, at, peer.source, change=alive)
        store.attachments.add_pid(req.run_id, peer.pid, peer.start_time, at)
        run = store.views.run_object(store.runs.require(req.run_id))
        resumed = run.resumed_from
        return {"run": run, "resume_checkpoint": store.attachments.resume_checkpoint(resumed)
                if resumed else None}

    return _mutate(ctx, req, apply)


def handle_detach(ctx: Context, peer: Peer, req: Detach) -> Awaitable[Reply]:
    def apply(store: Store, at: float) -> Reply:
        store.runs.require(req.run_id)
        store.attachments.remove_pid(req.run_id, peer.pid)
        return {}

    return _mutate(ctx, req, apply)


def handle_heartbeat(ctx: Context, peer: Peer, req: Heartbeat) -> Awaitable[Reply]:
    """A heartbeat is applied once per `seq`. Seqs skipped by a later one are remembered:
    one of them arriving late (its write failed on a full disk and it was spooled, say) is
    counted then; any other older or equal seq is a replay."""
    if req.seq < 1:
        raise _bad("seq must count from 1")
    at = _event_time(req.at)

    def op(store: Store) -> Reply:
        if store.runs.heartbeat_running(req.run_id, req.seq, at):
            return {"state": State.RUNNING.value}
        row = store.runs.require(req.run_id)
        heartbeats = row.heartbeats + 1
        last = max(at, row.last_heartbeat_at or 0.0)
        if req.seq <= row.heartbeat_seq:
            if store.runs.fill_heartbeat_gap(req.run_id, req.seq):
                store.runs.update(req.run_id, RunUpdate(heartbeats=heartbeats,
                                                        last_heartbeat_at=last))
            return {"state": row.state.value}
        store.runs.note_heartbeat_gap(req.run_id, row.heartbeat_seq, req.seq)
        counted = RunUpdate(heartbeat_seq=req.seq, heartbeats=heartbeats, last_heartbeat_at=last)
        if inferred_end_after(store, row, at) is not None:  # spooled, from before that end
            store.runs.update(req.run_id, counted)
            return {"state": row.state.value}
        state = transition(store, row, Event.HEARTBEAT, at, peer.source, change=counted)
        return {"state": state.value}

    return ctx.registry.submit(op)


def handle_succeed(ctx: Context, peer: Peer, req: Succeed) -> Awaitable[Reply]:
    def apply(store: Store, at: float) -> Reply:
        row = before_inferred_end(store, store.runs.require(req.run_id), at)
        state = transition(store, row, Event.SUCCEED, at, peer.source,
                           change=RunUpdate(ended_at=at))
        return {"state": state.value}

    return _mutate(ctx, req, apply)


_CAUSE = re.compile(r"[a-z0-9_]{1,64}")
_FAIL_EVENTS = {
    FailReason.CRASH: (Event.FAIL_CRASH, "Error"),
    FailReason.ABANDONED: (Event.FAIL_ABANDONED, "Abandoned"),
    FailReason.TIMEOUT: (Event.FAIL_TIMEOUT, "Timeout"),
}


def handle_fail(ctx: Context, peer: Peer, req: Fail) -> Awaitable[Reply]:
    if req.reason not in _FAIL_EVENTS:
        raise _bad(f"reason must be one of {', '.join(_FAIL_EVENTS)}")
    if req.cause is not None and not _CAUSE.fullmatch(req.cause):
        raise _bad("cause must be 1-64 characters of a-z, 0-9 and '_'")
    event, default_class = _FAIL_EVENTS[FailReason(req.reason)]
    message = req.message or ""
    if req.category_hint == "oom" and ctx.sampler is not None and "peak" not in message:
        peak = ctx.sampler.peak_text(req.run_id)
        message = f"{message}: {peak}" if peak else message

    def apply(store: Store, at: float) -> Reply:
        row = before_inferred_end(store, store.runs.require(req.run_id), at)
        record = failure_record(
            req.failure_class or default_class, message, req.reason, at,
            category_hint=req.category_hint, traceback=req.traceback, phase=req.phase,
            exit_code=req.exit_code, signal=req.signal,
        )
        state = end_with_failure(store, row, event, record, peer.source, cause=req.cause)
        return {"state": state.value, "category": record.category,
                "retryable": record.retryable}

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
        row = store.runs.require(req.run_id)
        record = failure_record("Cancelled", req.message or "cancelled by the user",
                                FailReason.ABANDONED, at)
        state = end_with_failure(store, row, Event.CANCEL, record, "cancel")
        targets.extend(store.attachments.pid_records(req.run_id))
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
        row = store.runs.require(req.run_id)
        if row.state.terminal:
            raise RunnerdError(ErrorCode.INVALID_TRANSITION,
                               f"cannot checkpoint a run that is {row.state}")
        return {"seq": store.attachments.add_checkpoint(req.run_id, data, req.path, at)}

    return _mutate(ctx, req, apply)


LABELS = ("oom", "walltime", "retired", "killed_worker")


def handle_label(ctx: Context, peer: Peer, req: Label) -> Awaitable[Reply]:
    """Keep what killed a run; a failed run is re-diagnosed now, an active one when it
    fails (the witness may speak before the daemon has seen the death)."""
    if req.category not in LABELS:
        raise _bad(f"category must be one of {', '.join(LABELS)}")
    note = (req.note or "")[:MAX_NAME] or None

    def apply(store: Store, at: float) -> Reply:
        row = store.runs.require(req.run_id)
        store.failures.put_label(req.run_id, req.category, note, at)
        failure = store.failures.get(req.run_id) if row.failed else None
        if failure is None:
            return {"state": row.state.value, "applied": False}
        record = relabelled(failure, req.category, note)
        store.failures.put(req.run_id, record)
        return {"state": row.state.value, "applied": True, "category": record.category,
                "retryable": bool(record.retryable)}

    return _mutate(ctx, req, apply)


# Hashing has threads of its own, few: it is bound by the disk, and artifacts hashed at once
# must leave the loop's worker threads (and every other request) free.
HASH_WORKERS = 4
_hashing = ThreadPoolExecutor(max_workers=HASH_WORKERS, thread_name_prefix="runnerd-hash")
HASH_CHUNK = 1 << 20
# Kernel interfaces: their files may read forever (/proc/self/pagemap) or change as read.
KERNEL_TREES = ("/proc", "/sys")


def file_digest(path: str, timeout: float = ARTIFACT_TIMEOUT) -> tuple[int, str]:
    """Size and sha256 of a regular file, read within `timeout` seconds. Anything else is a
    clear error: a folder, device, FIFO or socket (refused before it is opened), a file
    under /proc or /sys (checked on the path with every symlink resolved, before any stat
    there), a file that changes while it is read, one too slow to read."""
    if not os.path.isabs(path) or "\0" in path:
        raise _bad(f"artifact path must be absolute: {path!r}")
    real = os.path.realpath(path)
    for tree in KERNEL_TREES:
        if real == tree or real.startswith(f"{tree}/"):
            raise _bad(f"artifact {path} is under {tree}, a kernel interface, not a file")
    try:
        info = os.stat(real)
        _require_regular(path, info)
        # O_NONBLOCK: a FIFO swapped in since the stat must not wait for a writer.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
        with open(fd, "rb", buffering=0) as fh:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                raise _bad(f"artifact {path} changed while it was opened")
            digest = _sha256(fh, opened.st_size, path, timeout)
            after = os.fstat(fd)
    except FileNotFoundError:
        raise _bad(f"artifact {path} does not exist") from None
    except OSError as exc:
        raise _bad(f"artifact {path} cannot be read: {exc.strerror}") from None
    if (after.st_size, after.st_mtime_ns) != (opened.st_size, opened.st_mtime_ns):
        raise _bad(f"artifact {path} changed while it was hashed ({opened.st_size} bytes, then "
                   f"{after.st_size}): register it once it is complete")
    return opened.st_size, digest


FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
              (stat.S_ISSOCK, "a socket"))


def _require_regular(path: str, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in FILE_KINDS if test(info.st_mode)), "special")
        raise _bad(f"artifact {path} is {kind}, not a regular file")


def _sha256(fh: io.FileIO, size: int, path: str, timeout: float) -> str:
    """The sha256 of the first `size` bytes (what the file held when opened: one that grows
    is caught afterwards, never read forever), given up after `timeout` seconds."""
    digest = hashlib.sha256()
    deadline = time.monotonic() + timeout
    buffer = memoryview(bytearray(HASH_CHUNK))
    left = size
    while left > 0:
        n = fh.readinto(buffer[:min(HASH_CHUNK, left)])
        if not n:
            break  # it shrank: the size check afterwards says so
        digest.update(buffer[:n])
        left -= n
        if time.monotonic() > deadline:
            raise RunnerdError(ErrorCode.TOO_LARGE, (
                f"artifact {path} could not be hashed within {timeout:g} s (artifact_timeout): "
                f"{size - left} of {size} bytes read. Register a smaller file, or raise "
                "artifact_timeout in config.toml"))
    return digest.hexdigest()


async def handle_artifact(ctx: Context, peer: Peer, req: Artifact) -> Reply:
    return await hash_and_record(ctx, req)


async def hash_and_record(ctx: Context, req: Artifact) -> Reply:
    """Hash the file on the hashing threads (bounded, timed out), then record it."""
    digest = await asyncio.get_running_loop().run_in_executor(
        _hashing, file_digest, req.path, ctx.config.artifact_timeout)
    return await record_artifact(ctx, req, digest)


def record_artifact(ctx: Context, req: Artifact, digest: tuple[int, str]) -> Awaitable[Reply]:
    """Queue the record of an artifact whose size and sha256 are known."""
    size, sha256 = digest
    path = os.path.normpath(req.path)

    def apply(store: Store, at: float) -> Reply:
        store.runs.require(req.run_id)
        store.attachments.put_artifact(req.run_id, path, size, sha256, at)
        return {"path": path, "size": size, "sha256": sha256}

    return _mutate(ctx, req, apply)


# --- reads ------------------------------------------------------------------


async def handle_get(ctx: Context, peer: Peer, req: Get) -> Reply:
    return {"run": await ctx.registry.read(lambda s: s.views.run_details(s.runs.resolve(req.run)))}


async def handle_list(ctx: Context, peer: Peer, req: ListRuns) -> Reply:
    if req.state is not None and req.state not in State.__members__.values():
        raise _bad(f"unknown state {req.state!r}")
    if not 1 <= req.limit <= MAX_LIST:
        raise _bad(f"limit must be between 1 and {MAX_LIST}")

    def read(store: Store) -> list[RunInfo]:
        if req.interrupted:
            return store.views.interrupted_runs(req.limit)
        sweep_id = store.sweeps.resolve(req.sweep) if req.sweep is not None else None
        return store.views.list_runs(state=req.state, experiment=req.experiment, since=req.since,
                               limit=req.limit, sweep_id=sweep_id)

    return {"runs": await ctx.registry.read(read)}


async def handle_status(ctx: Context, peer: Peer, req: Status) -> Reply:
    limit = max(1, min(req.limit, 100))

    def read(store: Store) -> tuple[dict[str, int], list[RunInfo], list[ListedFailure]]:
        return (store.views.counts(), store.views.active_runs(limit),
                store.failures.listing(limit=limit))

    counts, active, failures = await ctx.registry.read(read)
    daemon = DaemonInfo(
        version=__version__, protocol=PROTOCOL_VERSION, pid=os.getpid(),
        uptime_sec=round(time.time() - ctx.started_at, 3), socket=str(ctx.config.socket),
        db=str(ctx.config.db), db_bytes=_db_size(ctx.config.db), clients=ctx.connections)
    body = fields_of(StatusInfo(counts, active, failures, daemon))
    return body


GROUP_KEYS = {"class": "failure_class", "signature": "signature", "category": "category"}


async def handle_failures(ctx: Context, peer: Peer, req: Failures) -> Reply:
    if req.group_by is not None and req.group_by not in GROUP_KEYS:
        raise _bad(f"group_by must be one of {', '.join(GROUP_KEYS)}")
    if not 1 <= req.limit <= MAX_LIST:
        raise _bad(f"limit must be between 1 and {MAX_LIST}")
    if req.group_by is None:
        def read(store: Store) -> Reply:
            run_id = store.runs.resolve(req.run) if req.run else None
            return {"failures": store.failures.listing(since=req.since, experiment=req.experiment,
                                               run_id=run_id, limit=req.limit)}
        return await ctx.registry.read(read)
    key = GROUP_KEYS[req.group_by]
    return {"groups": await ctx.registry.read(lambda s: s.failures.groups(
        key, since=req.since, experiment=req.experiment, limit=req.limit))}


async def handle_export(ctx: Context, peer: Peer, req: Export) -> Reply:
    if req.what not in ("runs", "failures"):
        raise _bad("what must be 'runs' or 'failures'")
    if not 1 <= req.limit <= MAX_LIST:
        raise _bad(f"limit must be between 1 and {MAX_LIST}")
    items = await ctx.registry.read(lambda s: s.views.export_page(req.what, req.after, req.limit))
    return {"items": items, "next": items[-1].run_id if len(items) == req.limit else None}


def _folder(path: str) -> str:
    if not os.path.isabs(path) or "\0" in path:
        raise _bad(f"path must be absolute: {path!r}")
    return os.path.normpath(path)


async def handle_watch(ctx: Context, peer: Peer, req: Watch) -> Reply:
    folder = _folder(req.path)
    if not os.path.isdir(folder):
        raise _bad(f"{folder} is not a directory")
    try:
        return (await ctx.indexer.add(folder)).as_reply()
    except OSError as exc:  # refused (/proc, another user's, anyone may write to it)
        raise RunnerdError(ErrorCode.FORBIDDEN, str(exc)) from None


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


# --- sweeps -----------------------------------------------------------------


def _sweep_cells(spec: dict[str, Any], max_cells: int) -> list[tuple[int, str, str]]:
    """(index, params JSON, variation) of each cell of a spec, refused when malformed."""
    try:
        total = count(spec)
        if not 1 <= total <= max_cells:
            raise _bad(f"a sweep has 1 to {max_cells} cells, not {total}")
        return [(i, _json(params, f"cell {i}"), variation(params))
                for i, params in enumerate(expand(spec))]
    except SpecError as exc:
        raise _bad(str(exc)) from None


async def handle_sweep_create(ctx: Context, peer: Peer, req: SweepCreate) -> Reply:
    if not is_valid_run_id(req.sweep_id):
        raise _bad("sweep_id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    if not req.experiment or len(req.experiment) > MAX_NAME:
        raise _bad(f"experiment must be 1-{MAX_NAME} characters")
    if req.failure_policy not in SweepPolicy.__members__.values():
        raise _bad(f"failure_policy must be one of {', '.join(SweepPolicy)}")
    folder = _folder(req.folder) if req.folder else str(paths.data_dir() / "sweeps" /
                                                        req.sweep_id)
    spec = _json(req.spec, "spec")
    cells = await anyio.to_thread.run_sync(_sweep_cells, req.spec, MAX_CELLS)

    def apply(store: Store, at: float) -> Reply:
        if store.sweeps.get(req.sweep_id) is not None:
            raise RunnerdError(ErrorCode.CONFLICT, f"sweep {req.sweep_id} already exists")
        store.sweeps.create(NewSweep(
            sweep_id=req.sweep_id, experiment=req.experiment,
            failure_policy=req.failure_policy, spec_json=spec, folder=folder,
            driver_pid=peer.pid, driver_start=peer.start_time, created_at=at), cells)
        return {"sweep_id": req.sweep_id, "folder": folder, "cells": len(cells)}

    return await _mutate(ctx, req, apply)


def handle_sweep_start(ctx: Context, peer: Peer, req: SweepStart) -> Awaitable[Reply]:
    def apply(store: Store, at: float) -> Reply:
        row = store.sweeps.require(req.sweep_id)
        if sweeps.status(row) == SweepStatus.RUNNING and row.driver_pid not in (None,
                                                                                    peer.pid):
            return {"sweep_id": req.sweep_id, "driver_pid": row.driver_pid}  # it helps
        store.sweeps.take_over(req.sweep_id, peer.pid, peer.start_time)
        return {"sweep_id": req.sweep_id, "driver_pid": peer.pid}

    return _mutate(ctx, req, apply)


async def handle_sweep_end(ctx: Context, peer: Peer, req: SweepEnd) -> Reply:
    """End the driver's turn; reply once manifest.json shows it."""
    ended = (SweepStatus.SUCCEEDED, SweepStatus.FAILED, SweepStatus.INTERRUPTED)
    if req.status not in ended:
        raise _bad(f"status must be one of {', '.join(ended)}")

    def apply(store: Store, at: float) -> Reply:
        row = store.sweeps.require(req.sweep_id)
        if store.sweeps.live_cells(req.sweep_id):
            # Another driver still runs cells of it: the last one to end ends the sweep.
            if row.driver_pid == peer.pid:
                store.sweeps.release(req.sweep_id)
            return {"sweep_id": req.sweep_id, "skipped": 0, "ended": False}
        skipped = store.sweeps.skip_unattempted(req.sweep_id) if req.skip else 0
        store.sweeps.end(req.sweep_id, req.status, at)
        store.events.log_sweep(req.sweep_id, row.experiment, "sweep_ended", at, {
            "status": req.status, "skipped": skipped,  # for hooks and follow
            "cells": store.sweeps.summary(req.sweep_id)})
        return {"sweep_id": req.sweep_id, "skipped": skipped, "ended": True}

    reply = await _mutate(ctx, req, apply)
    return {**reply, "manifest": await ctx.manifests.flush(req.sweep_id)}


async def handle_sweep_get(ctx: Context, peer: Peer, req: SweepGet) -> Reply:
    def read(store: Store) -> SweepInfo:
        return sweeps.sweep_object(store, store.sweeps.require(store.sweeps.resolve(req.sweep)))
    return {"sweep": await ctx.registry.read(read)}


async def handle_sweep_cells(ctx: Context, peer: Peer, req: SweepCells) -> Reply:
    if not 1 <= req.limit <= MAX_LIST:
        raise _bad(f"limit must be between 1 and {MAX_LIST}")

    def read(store: Store) -> list[CellInfo]:
        return store.sweeps.cells(store.sweeps.resolve(req.sweep), after=req.after,
                           limit=req.limit + 1, unfinished=req.unfinished)

    cells = await ctx.registry.read(read)
    more = len(cells) > req.limit
    cells = cells[:req.limit]
    return {"cells": cells, "next": cells[-1].index if more else None}


async def handle_sweep_list(ctx: Context, peer: Peer, req: SweepList) -> Reply:
    if not 1 <= req.limit <= MAX_LIST:
        raise _bad(f"limit must be between 1 and {MAX_LIST}")
    return {"sweeps": await ctx.registry.read(lambda store: [
        sweeps.sweep_object(store, row) for row in store.sweeps.latest(req.limit)])}


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
    Label: handle_label,
    SweepCreate: handle_sweep_create,
    SweepStart: handle_sweep_start,
    SweepEnd: handle_sweep_end,
    SweepGet: handle_sweep_get,
    SweepCells: handle_sweep_cells,
    SweepList: handle_sweep_list,
    HookList: handle_hooks,
}
