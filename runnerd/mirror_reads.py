"""What the mirror reads from the registry, each a function for the registry's reading thread
(`Registry.read`): the records to write, and the events that say which runs changed and
whether a node folder in the shared folder mirrors this very registry."""

from __future__ import annotations

from typing import Any

from runnerd.registry import Store
from runnerd_client.protocol import RunnerdError
from runnerd_client.replies import as_map

MAX_CHECKPOINTS = 100  # the newest kept in a mirrored run (a run may have thousands)


def details(store: Store, run_ids: list[str]) -> list[dict[str, Any]]:
    """The records to write (as `show --json`); a run pruned since it changed is skipped."""
    records = []
    for run_id in run_ids:
        try:
            record = as_map(store.views.run_details(run_id))
        except RunnerdError:
            continue
        del record["checkpoints"][:-MAX_CHECKPOINTS]
        records.append(record)
    return records


def snapshot_page(store: Store, after: str | None, limit: int) -> list[dict[str, Any]]:
    return details(store, [r.run_id for r in store.views.export_page("runs", after, limit)])


def anchor(store: Store, seq: int) -> list[Any] | None:
    """What identifies event `seq` of this registry (its run and time)."""
    events = store.events.after(seq - 1, None, None, None, 1) if seq else []
    if not events or events[0]["seq"] != seq:
        return None
    return [events[0]["run_id"], events[0]["at"]]


def same_registry(store: Store, header: dict[str, Any]) -> bool:
    """Whether this registry is the one a node folder mirrors: the event it last mirrored
    is still this registry's. A registry made anew (the node's disk wiped) is behind it."""
    seq = header.get("seq")
    if not isinstance(seq, int) or seq <= 0:
        return True  # nothing mirrored yet: any registry may carry on
    found = anchor(store, seq)
    if found is not None:
        return found == header.get("anchor")
    return store.events.last_seq() >= seq  # that event was pruned


def events_after(store: Store, seq: int, limit: int) -> list[tuple[int, str | None]]:
    return [(e["seq"], e["run_id"]) for e in store.events.after(seq, None, None, None, limit)]


def last_seq(store: Store) -> int:
    return store.events.last_seq()


def active(store: Store) -> list[str]:
    return [r.run_id for r in store.views.active_runs(10_000)]
