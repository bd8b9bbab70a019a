"""Wire protocol version 1, the one module both the daemon and the client import.

Frames are a 4-byte big-endian length followed by one msgpack map. Requests are
frozen dataclasses, one per operation; `decode_request` is the only place where a
wire map becomes a typed request, so every field is checked exactly once.
"""

from __future__ import annotations

import enum
import math
import struct
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

import msgpack

from runnerd_client.replies import fields_of

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 1 << 20
MAX_ITEMS = 10_000
"""Map entries plus list items a request may hold in all: decoding costs 1-2 µs each on
the daemon's event loop, so this bounds what one frame can cost everyone else."""
MAX_DEPTH = 64
"""How deeply a request's values may nest (its fields are at depth 1)."""
HEADER = struct.Struct(">I")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ErrorCode(enum.StrEnum):
    """The closed set of error codes a reply may carry (SPEC §4)."""

    BAD_FRAME = "bad_frame"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_RUN = "unknown_run"
    INVALID_TRANSITION = "invalid_transition"
    VERSION_MISMATCH = "version_mismatch"
    TOO_LARGE = "too_large"
    FORBIDDEN = "forbidden"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class RunnerdError(Exception):
    """An error with a wire code: raised by the daemon's logic, re-raised by clients."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


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


# --- requests ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """Base of every request; `op` names it on the wire."""

    op: ClassVar[str]
    mutating: ClassVar[bool] = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Mutation(Request):
    """A request that changes the registry: carries an idempotency key and event time."""

    mutating: ClassVar[bool] = True
    key: str
    run_id: str
    at: float | None = None

    @property
    def subject(self) -> str:
        """What the idempotency key belongs to."""
        return self.run_id


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepMutation(Request):
    """A request that changes a sweep (not a run): keyed like every mutation."""

    mutating: ClassVar[bool] = True
    key: str
    sweep_id: str
    at: float | None = None

    @property
    def subject(self) -> str:
        return self.sweep_id


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Request):
    op: ClassVar[str] = "hello"
    v: int
    client: str = "unknown"


@dataclass(frozen=True, slots=True, kw_only=True)
class Create(Mutation):
    op: ClassVar[str] = "create"
    experiment: str
    variation: str = "default"
    params: dict[str, Any] | None = None
    tags: dict[str, Any] | None = None
    cwd: str | None = None
    run_dir: str | None = None
    host: str | None = None
    retry_of: str | None = None
    launch: dict[str, Any] | None = None
    resume: bool = False
    sweep_id: str | None = None
    cell: int | None = None
    claim_after: str | None = None
    """With `sweep_id`: the run of the cell's latest attempt this one follows (None: the cell
    has none yet). The cell is claimed only if that is still so, and no attempt is live."""
    claim_token: str | None = None
    """What task this attempt runs, in its scheduler's own terms (Dask's task key). With
    `sweep_id`, an attempt carrying the token of the cell's latest attempt claims the cell
    whatever `claim_after` says: it is the scheduler running that very task again."""
    replicates: bool = False
    """With `sweep_id`: the attempt replicates the cell (`sweep replicate`). It is linked to
    the cell but claims nothing: the sweep's outcomes stay as they were."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Start(Mutation):
    op: ClassVar[str] = "start"
    heartbeat_timeout: float | None = None
    lost_grace: float | None = None
    deadline: float | None = None
    stall_timeout: float | None = None
    """Seconds without progress of any kind (CPU, output, files, heartbeats) before the run
    is lost as stalled; 0: never. None: the daemon's `stall_timeout`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Attach(Mutation):
    op: ClassVar[str] = "attach"


@dataclass(frozen=True, slots=True, kw_only=True)
class Detach(Mutation):
    op: ClassVar[str] = "detach"


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Request):
    """A heartbeat's idempotency key is its per-run sequence number `seq`."""

    op: ClassVar[str] = "heartbeat"
    mutating: ClassVar[bool] = True
    run_id: str
    seq: int
    at: float | None = None
    progress: bool | None = None
    """False: sent on a timer (a library's thread, runnerctl exec), so it says the run is
    alive, not that it moves; True or absent: its code made progress."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Succeed(Mutation):
    op: ClassVar[str] = "succeed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Fail(Mutation):
    op: ClassVar[str] = "fail"
    reason: str = FailReason.CRASH
    failure_class: str | None = None
    message: str | None = None
    traceback: str | None = None
    phase: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    category_hint: str | None = None
    cause: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Artifact(Mutation):
    op: ClassVar[str] = "artifact"
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint(Mutation):
    op: ClassVar[str] = "checkpoint"
    data: dict[str, Any] | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(Mutation):
    """End a run `failed_abandoned`; with `signal` (TERM, KILL, INT...) also signal the
    processes attached to it (as the daemon knows them, never as the request says)."""

    op: ClassVar[str] = "cancel"
    message: str | None = None
    signal: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Get(Request):
    """`run` is a run_id or any unique prefix of one."""

    op: ClassVar[str] = "get"
    run: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ListRuns(Request):
    op: ClassVar[str] = "list"
    state: str | None = None
    experiment: str | None = None
    since: float | None = None
    sweep: str | None = None
    interrupted: bool = False
    """Only runs the reconciler found interrupted that no later attempt has taken up."""
    limit: int = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class Status(Request):
    op: ClassVar[str] = "status"
    limit: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class Failures(Request):
    """Failure records, newest first, or with `group_by` their groups, largest first."""

    op: ClassVar[str] = "failures"
    group_by: str | None = None
    since: float | None = None
    experiment: str | None = None
    run: str | None = None
    limit: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class Export(Request):
    """One page of the registry in run_id order; pass the reply's `next` as `after`."""

    op: ClassVar[str] = "export"
    what: str = "runs"
    after: str | None = None
    limit: int = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class Watch(Request):
    """Add a directory to the crash indexer: scanned once in full, then followed."""

    op: ClassVar[str] = "watch"
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Unwatch(Request):
    op: ClassVar[str] = "unwatch"
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Prune(Request):
    """Delete terminal runs that ended before `before` (epoch seconds); never an active one."""

    op: ClassVar[str] = "prune"
    mutating: ClassVar[bool] = True
    before: float
    states: list[str] | None = None
    dry_run: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe(Request):
    """From now on this connection also receives event frames (maps with an `event` key
    and no `id`): of one run, one experiment, or everything; `since` replays the log
    after that seq first."""

    op: ClassVar[str] = "subscribe"
    run: str | None = None
    experiment: str | None = None
    sweep: str | None = None
    since: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HookList(Request):
    """The configured hooks, each with its cursor, backlog and last result."""

    op: ClassVar[str] = "hooks"


@dataclass(frozen=True, slots=True, kw_only=True)
class Label(Mutation):
    """What killed a run, from someone who saw it (Dask's scheduler): `oom`, `walltime`,
    `retired` or `killed_worker`. It re-diagnoses a failed run, or waits for the run to
    fail if the daemon has not seen it end yet."""

    op: ClassVar[str] = "label"
    category: str
    note: str | None = None


class SweepPolicy(enum.StrEnum):
    """What a sweep does when a cell fails after its retries (SPEC §8)."""

    FAIL_FAST = "fail_fast"
    CONTINUE_ON_FAILURE = "continue_on_failure"


class SweepStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepCreate(SweepMutation):
    """Store a sweep and its cells (expanded from `spec`); the caller becomes its driver."""

    op: ClassVar[str] = "sweep_create"
    experiment: str
    spec: dict[str, Any]
    failure_policy: str = SweepPolicy.FAIL_FAST
    folder: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepStart(SweepMutation):
    """A resume or replicate takes the sweep over: it is running again, driven by the caller."""

    op: ClassVar[str] = "sweep_start"


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepEnd(SweepMutation):
    """The driver is done; with `skip`, cells never attempted are marked skipped. The reply
    comes once manifest.json is written."""

    op: ClassVar[str] = "sweep_end"
    status: str
    skip: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepGet(Request):
    """A sweep (id or unique prefix) with its spec and cells summary, without its cells."""

    op: ClassVar[str] = "sweep_get"
    sweep: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepCells(Request):
    """One page of a sweep's cells in index order, from just after `after`."""

    op: ClassVar[str] = "sweep_cells"
    sweep: str
    after: int = -1
    limit: int = 1000
    unfinished: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepList(Request):
    op: ClassVar[str] = "sweep_list"
    limit: int = 50


REQUESTS: dict[str, type[Request]] = {
    cls.op: cls
    for cls in (
        Hello, Create, Start, Attach, Detach, Heartbeat, Succeed, Fail,
        Artifact, Checkpoint, Cancel, Get, ListRuns, Status, Failures, Export, Watch,
        Unwatch, Prune, Subscribe, Label, SweepCreate, SweepStart, SweepEnd, SweepGet, SweepCells,
        SweepList, HookList,
    )
}


# --- field checking ---------------------------------------------------------


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    """Map a field annotation to the Python types msgpack may deliver for it."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(t for arg in typing.get_args(annotation) for t in _allowed_types(arg))
    origin = typing.get_origin(annotation) or annotation
    if annotation is type(None):
        return (type(None),)
    if origin is float:
        return (float, int)
    return (origin,)


_FIELDS: dict[type[Request], tuple[tuple[str, tuple[type, ...], bool], ...]] = {}


def _field_specs(cls: type[Request]) -> tuple[tuple[str, tuple[type, ...], bool], ...]:
    """(name, allowed types, required) for each field of a request class, cached."""
    specs = _FIELDS.get(cls)
    if specs is None:
        hints = typing.get_type_hints(cls)
        specs = tuple(
            (f.name, _allowed_types(hints[f.name]), f.default is MISSING)
            for f in fields(cls)
        )
        _FIELDS[cls] = specs
    return specs


def _type_name(allowed: tuple[type, ...]) -> str:
    return " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in allowed}))


def decode_request(msg: dict[Any, Any]) -> tuple[int | None, Request]:
    """Turn a wire map into (id, typed request); raise RunnerdError when it is not one."""
    req_id = msg.get("id")
    if req_id is not None and (type(req_id) is not int or not INT64_MIN <= req_id <= INT64_MAX):
        raise RunnerdError(ErrorCode.BAD_REQUEST,
                           "field 'id' must be an integer that fits in a signed 64-bit int")
    op = msg.get("op")
    if not isinstance(op, str):
        raise RunnerdError(ErrorCode.BAD_REQUEST, "field 'op' is missing or not a string")
    cls = REQUESTS.get(op)
    if cls is None:
        raise RunnerdError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}")
    kwargs: dict[str, Any] = {}
    for name, allowed, required in _field_specs(cls):
        if name not in msg:
            if required:
                raise RunnerdError(ErrorCode.BAD_REQUEST, f"{op}: missing field {name!r}")
            continue
        value = msg[name]
        if not isinstance(value, allowed) or (type(value) is bool and bool not in allowed):
            raise RunnerdError(
                ErrorCode.BAD_REQUEST, f"{op}: field {name!r} must be {_type_name(allowed)}"
            )
        if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
            raise RunnerdError(ErrorCode.BAD_REQUEST, f"{op}: field {name!r} is out of range")
        if type(value) is float and not math.isfinite(value):
            raise RunnerdError(ErrorCode.BAD_REQUEST, f"{op}: field {name!r} must be finite")
        kwargs[name] = value
    return req_id, cls(**kwargs)


def request_map(req: Request) -> dict[str, Any]:
    """A request as a wire map without an id; fields left at None are not sent."""
    msg: dict[str, Any] = {"op": req.op}
    for f in fields(req):
        value = getattr(req, f.name)
        if value is not None:
            msg[f.name] = value
    return msg


def encode_request(req_id: int, req: Request) -> bytes:
    """Frame a request with its id."""
    return frame({**request_map(req), "id": req_id})


# --- framing and replies ----------------------------------------------------


def frame(msg: dict[str, Any]) -> bytes:
    """Pack one map into a length-prefixed frame."""
    body: bytes = msgpack.packb(msg, use_bin_type=True, default=fields_of)
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes) -> Any:
    """Decode a frame body; raise RunnerdError(bad_frame) if it is not msgpack."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise RunnerdError(ErrorCode.BAD_FRAME, f"body is not valid msgpack: {exc}") from None


class LimitExceeded(RunnerdError):
    """A request refused for its size or shape; `req_id` is its id, if it had one."""

    def __init__(self, req_id: int | None, message: str) -> None:
        super().__init__(ErrorCode.BAD_REQUEST, message)
        self.req_id = req_id


class _Counted(Exception):
    """Raised from msgpack's hooks to stop decoding a request that holds too many items."""


def _counting_hook(max_items: int) -> Callable[[Any], Any]:
    """A hook msgpack calls with each map and list it builds, bottom up: it stops the
    decoding once they hold more than `max_items` items in all."""
    seen = 0

    def hook(container: Any) -> Any:
        nonlocal seen
        seen += len(container)
        if seen > max_items:
            raise _Counted
        return container

    return hook


def unpack_request(body: bytes, max_items: int = MAX_ITEMS) -> dict[Any, Any]:
    """Decode a request frame's body like `unpack_body`, into a map. A request of more than
    `max_items` items is refused (LimitExceeded) as soon as that many are built, at most
    twice `max_items`: one map or list that large is refused before it is built, and a
    body too short to hold that many (items take a byte at least) is not counted."""
    hook = _counting_hook(max_items) if len(body) > max_items else None
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False, max_map_len=max_items,
                              max_array_len=max_items, object_hook=hook, list_hook=hook)
    except (ValueError, _Counted) as exc:
        if (isinstance(exc, _Counted) or "exceeds max_" in str(exc)) and _whole_map(body):
            raise LimitExceeded(_scan_id(body), _too_many(max_items)) from None
        raise RunnerdError(ErrorCode.BAD_FRAME, f"body is not valid msgpack: {exc}") from None
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise RunnerdError(ErrorCode.BAD_FRAME, f"body is not valid msgpack: {exc}") from None
    if not isinstance(msg, dict):
        raise RunnerdError(ErrorCode.BAD_FRAME, "a frame must hold a msgpack map")
    return msg


def check_shape(msg: dict[Any, Any], req_id: int | None, max_items: int = MAX_ITEMS,
                max_depth: int = MAX_DEPTH) -> None:
    """Refuse (LimitExceeded) a request whose maps and lists hold more than `max_items`
    items in all, or nest deeper than `max_depth`."""
    shape = _shape_error(msg, max_items, max_depth)
    if shape == "items":
        raise LimitExceeded(req_id, _too_many(max_items))
    if shape == "depth":
        raise LimitExceeded(req_id, f"a request's values nest at most {max_depth} levels"
                            " (max_depth)")


def _too_many(max_items: int) -> str:
    return f"a request holds at most {max_items} map entries and list items in all (max_items)"


def _valid_id(value: Any) -> bool:
    return type(value) is int and INT64_MIN <= value <= INT64_MAX


def _whole_map(body: bytes) -> bool:
    """Whether `body` is exactly one well-formed map, checked by skipping through it in C
    (nothing is built): a lying length header is bad msgpack, not a big request."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(body), 1))
    unpacker.feed(body)
    try:
        for _ in range(2 * unpacker.read_map_header()):
            unpacker.skip()
    except Exception:  # msgpack raises several unrelated exception types
        return False
    return bool(unpacker.tell() == len(body))


def _scan_id(body: bytes) -> int | None:
    """The top-level `id` of a frame refused before it was built, found by skipping the
    other fields (in C, without building them), so the error can answer that request."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(body))
    unpacker.feed(body)
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "id":
                value = unpacker.unpack()
                return value if _valid_id(value) else None
            unpacker.skip()
    except Exception:  # msgpack raises several unrelated exception types
        return None
    return None


def _shape_error(value: Any, max_items: int, max_depth: int) -> str | None:
    """'items' or 'depth' when `value`'s maps and lists hold too many items in all or nest
    too deeply (walked without recursion); None when they are within bounds."""
    if not isinstance(value, dict | list):
        return None
    children = value.values() if isinstance(value, dict) else value
    if not any(isinstance(child, dict | list) for child in children):  # most requests
        return "items" if len(value) > max_items else None
    items = 0
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return "depth"
        items += len(node)
        if items > max_items:
            return "items"
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return None


def ok_reply(req_id: int | None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": req_id, "ok": True, **(data or {})}


def error_reply(req_id: int | None, code: ErrorCode | str, message: str) -> dict[str, Any]:
    return {"id": req_id, "ok": False, "error": {"code": str(code), "message": message}}


def raise_for_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """Return an ok reply as is; raise the RunnerdError an error reply carries."""
    if reply.get("ok"):
        return reply
    error = reply.get("error") or {}
    raise RunnerdError(str(error.get("code", "internal")), str(error.get("message", "")))
