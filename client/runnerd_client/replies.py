"""What the daemon answers about runs, sweeps and itself, typed: frozen, slotted dataclasses
whose fields, in order, are the keys of the wire map (SPEC §3, §6, §8). They become maps in
one place, `framing.fields_of` (`as_map` for a whole reply), and maps become them again in
one place, `decode`: how runnerctl reads the replies it shows.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from runnerd_client.errors import ErrorCode, RunnerdError
from runnerd_client.framing import as_map, fields_of, wire_keys

__all__ = ["MalformedReply", "as_map", "decode", "fields_of"]  # and the reply classes below


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


# --- maps back into reply objects --------------------------------------------------


T = TypeVar("T")
_Convert = Callable[[Any, str], Any]
_Plan = tuple[tuple[str, str, bool, _Convert | None], ...]
_PLANS: dict[type, _Plan] = {}


class MalformedReply(RunnerdError):
    """A reply (or a record written as one: an export line, a mirrored run) that lacks a
    field its class has no default for, or holds something other than a map or list where
    reply objects nest: its writer and this client disagree."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_FRAME, f"malformed reply: {message}")


def decode(cls: type[T], value: Any, reply: str | None = None) -> T:
    """`value`, a wire map, as a `cls` (nested reply objects too). A key `cls` does not
    know is ignored (a newer daemon may send more); a missing one raises MalformedReply
    naming `reply` (default: the class's name) and the path to the field."""
    return _build(cls, value, reply or cls.__name__)


def _build(cls: type[T], value: Any, where: str) -> T:
    if not isinstance(value, Mapping):
        raise MalformedReply(f"{where} is not a map")
    found: dict[str, Any] = {}
    for name, key, required, convert in _plan(cls):
        if key not in value:
            if required:
                raise MalformedReply(f"{where} has no {key!r}")
            continue
        item = value[key]
        found[name] = item if convert is None else convert(item, f"{where}.{key}")
    return cls(**found)


def _plan(cls: type) -> _Plan:
    """(attribute, wire key, required, how to build its value) of each field, once a class."""
    plan = _PLANS.get(cls)
    if plan is None:
        hints = get_type_hints(cls)
        plan = _PLANS[cls] = tuple(
            (
                name,
                key,
                f.default is MISSING and f.default_factory is MISSING,
                _converter(hints[name]),
            )
            for f, (name, key) in zip(fields(cls), wire_keys(cls), strict=True)
        )
    return plan


def _converter(hint: Any) -> _Convert | None:
    """How to build a field's value: a reply object, a list of them, either or None; None
    for a plain value, taken as it is."""
    if isinstance(hint, type) and is_dataclass(hint):
        return lambda value, where: _build(hint, value, where)
    args = get_args(hint)
    if get_origin(hint) is list and args and (each := _converter(args[0])) is not None:
        return lambda value, where: _each(each, value, where)
    if get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) == 1 and (convert := _converter(inner[0])) is not None:
            return lambda value, where: None if value is None else convert(value, where)
    return None


def _each(convert: _Convert, value: Any, where: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise MalformedReply(f"{where} is not a list")
    return [convert(item, f"{where}[{n}]") for n, item in enumerate(value)]
