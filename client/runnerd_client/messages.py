"""The protocol's messages: one frozen dataclass per request, each field declaring what it
may hold beside it (`runnerd_client.fields`); `REQUESTS` maps each `op` to its class."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from runnerd_client.enums import (
    ExportWhat,
    FailReason,
    GroupBy,
    LabelCategory,
    State,
    SweepPolicy,
    SweepStatus,
)
from runnerd_client.fields import (
    AbsolutePath,
    JsonMap,
    Limit,
    Name,
    OneOf,
    Pattern,
    Positive,
    Range,
    RunId,
)

CAUSE = Pattern(re.compile(r"[a-z0-9_]{1,64}"), "1-64 characters of a-z, 0-9 and '_'")


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
    run_id: RunId
    experiment: Name
    variation: Name = "default"
    params: JsonMap | None = None
    tags: JsonMap | None = None
    cwd: AbsolutePath | None = None
    run_dir: AbsolutePath | None = None
    host: str | None = None
    retry_of: RunId | None = None
    launch: JsonMap | None = None
    launch_env: JsonMap | None = field(default=None, repr=False)
    """The environment a launched command runs with (`runnerctl exec`), so that a rerun gets
    it again. The registry keeps it apart: no run object carries it, only `get` and
    `export` with `env`; no repr shows it."""
    resume: bool = False
    sweep_id: str | None = None
    cell: int | None = None
    claim_after: RunId | None = None
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
    heartbeat_timeout: Positive | None = None
    lost_grace: Positive | None = None
    deadline: Positive | None = None
    stall_timeout: Annotated[float, Range(0, what="0 (never) or positive")] | None = None
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
    seq: Annotated[int, Range(1)]
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
    reason: Annotated[str, OneOf.of(FailReason.CRASH, FailReason.ABANDONED, FailReason.TIMEOUT)] = (
        FailReason.CRASH
    )
    failure_class: str | None = None
    message: str | None = None
    traceback: str | None = None
    phase: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    category_hint: str | None = None
    cause: Annotated[str, CAUSE] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Artifact(Mutation):
    op: ClassVar[str] = "artifact"
    path: AbsolutePath


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint(Mutation):
    op: ClassVar[str] = "checkpoint"
    data: JsonMap | None = None
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
    env: bool = False
    """Also the environment the run was launched with (`env` in the reply; null if none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ListRuns(Request):
    op: ClassVar[str] = "list"
    state: Annotated[str, OneOf.of(State)] | None = None
    experiment: str | None = None
    since: float | None = None
    sweep: str | None = None
    interrupted: bool = False
    """Only runs the reconciler found interrupted that no later attempt has taken up."""
    limit: Limit = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class Status(Request):
    op: ClassVar[str] = "status"
    limit: int = 10
    runs: bool = False
    """Also `runs`: by state, the run ids (for counting the runs of several daemons once
    each); with `heard`, when each run was last heard of too."""
    heard: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Failures(Request):
    """Failure records, newest first, or with `group_by` their groups, largest first."""

    op: ClassVar[str] = "failures"
    group_by: Annotated[str, OneOf.of(GroupBy)] | None = None
    since: float | None = None
    experiment: str | None = None
    run: str | None = None
    limit: Limit = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class Export(Request):
    """One page of the registry in run_id order; pass the reply's `next` as `after`."""

    op: ClassVar[str] = "export"
    what: Annotated[str, OneOf.of(ExportWhat)] = ExportWhat.RUNS
    after: str | None = None
    limit: Limit = 500
    env: bool = False
    """With runs: each with `env`, the environment it was launched with (null if none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Watch(Request):
    """Add a directory to the crash indexer: scanned once in full, then followed."""

    op: ClassVar[str] = "watch"
    path: AbsolutePath


@dataclass(frozen=True, slots=True, kw_only=True)
class Unwatch(Request):
    op: ClassVar[str] = "unwatch"
    path: AbsolutePath


@dataclass(frozen=True, slots=True, kw_only=True)
class Prune(Request):
    """Delete terminal runs that ended before `before` (epoch seconds); never an active one."""

    op: ClassVar[str] = "prune"
    mutating: ClassVar[bool] = True
    before: float
    states: Annotated[list[str], OneOf.of(*(s for s in State if s.terminal))] | None = None
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
    since: Annotated[int, Range(0)] | None = None


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
    category: Annotated[str, OneOf.of(LabelCategory)]
    note: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepCreate(SweepMutation):
    """Store a sweep and its cells (expanded from `spec`); the caller becomes its driver."""

    op: ClassVar[str] = "sweep_create"
    sweep_id: RunId
    experiment: Name
    spec: dict[str, Any]
    failure_policy: Annotated[str, OneOf.of(SweepPolicy)] = SweepPolicy.FAIL_FAST
    folder: AbsolutePath | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepStart(SweepMutation):
    """A resume or replicate takes the sweep over: it is running again, driven by the caller."""

    op: ClassVar[str] = "sweep_start"


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepEnd(SweepMutation):
    """The driver is done; with `skip`, cells never attempted are marked skipped. The reply
    comes once manifest.json is written."""

    op: ClassVar[str] = "sweep_end"
    status: Annotated[
        str, OneOf.of(SweepStatus.SUCCEEDED, SweepStatus.FAILED, SweepStatus.INTERRUPTED)
    ]
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
    limit: Limit = 1000
    unfinished: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepList(Request):
    op: ClassVar[str] = "sweep_list"
    limit: Limit = 50


REQUESTS: dict[str, type[Request]] = {
    cls.op: cls
    for cls in (
        Hello,
        Create,
        Start,
        Attach,
        Detach,
        Heartbeat,
        Succeed,
        Fail,
        Artifact,
        Checkpoint,
        Cancel,
        Get,
        ListRuns,
        Status,
        Failures,
        Export,
        Watch,
        Unwatch,
        Prune,
        Subscribe,
        Label,
        SweepCreate,
        SweepStart,
        SweepEnd,
        SweepGet,
        SweepCells,
        SweepList,
        HookList,
    )
}
