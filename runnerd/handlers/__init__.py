"""The daemon's request handlers, one module per group of verbs, and the dispatch table.

A handler is `handle_<verb>(ctx, peer, request)` and returns an awaitable reply. Mutations
are queued on the registry's group-commit writer synchronously, before the handler yields,
so the mutations of one connection are applied in the order they arrived.

- `runs`: create, start, attach, detach, heartbeat, succeed, fail, cancel, label
- `artifacts`: artifact (hashed on threads of its own) and checkpoint
- `queries`: get, list, status, failures, export
- `sweeps`: sweep_create, sweep_start, sweep_end, sweep_get, sweep_cells, sweep_list
- `admin`: watch, unwatch, prune, hooks
- `claims`: which earlier attempt a new one follows, and when it may
- `context`: `Peer` and `Context`; `common`: what they all share
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from runnerd.handlers.admin import handle_hooks, handle_prune, handle_unwatch, handle_watch
from runnerd.handlers.artifacts import handle_artifact, handle_checkpoint, hash_and_record
from runnerd.handlers.context import Context, Peer, Reply
from runnerd.handlers.queries import (
    handle_export,
    handle_failures,
    handle_get,
    handle_list,
    handle_status,
)
from runnerd.handlers.runs import (
    handle_attach,
    handle_cancel,
    handle_create,
    handle_detach,
    handle_fail,
    handle_heartbeat,
    handle_label,
    handle_start,
    handle_succeed,
)
from runnerd.handlers.sweeps import (
    handle_sweep_cells,
    handle_sweep_create,
    handle_sweep_end,
    handle_sweep_get,
    handle_sweep_list,
    handle_sweep_start,
)
from runnerd_client.protocol import (
    Artifact,
    Attach,
    Cancel,
    Checkpoint,
    Create,
    Detach,
    Export,
    Fail,
    Failures,
    Get,
    Heartbeat,
    HookList,
    Label,
    ListRuns,
    Prune,
    Request,
    Start,
    Status,
    Succeed,
    SweepCells,
    SweepCreate,
    SweepEnd,
    SweepGet,
    SweepList,
    SweepStart,
    Unwatch,
    Watch,
)

__all__ = ["HANDLERS", "READS", "TASKS", "Context", "Handler", "Peer", "Reply", "hash_and_record"]

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
READS = frozenset({Get, ListRuns, Status, Failures, Export, SweepGet, SweepCells, SweepList})
"""Requests that only read the registry: they take turns on its reading thread."""
TASKS = (
    frozenset(cls for cls, handler in HANDLERS.items() if inspect.iscoroutinefunction(handler))
    - READS
)
"""The other requests whose handlers run as tasks (they await more than the writer)."""
