"""Several daemons, or their export files, as one: pure functions over what they answer.

Each node runs its own daemon (SPEC §9), so their runs are disjoint but for copies: a run
imported by another node's crash indexer, or a daemon exported twice into one folder.
Items are therefore merged by run_id, keeping the copy that heard from the run last, and
each names the daemon (socket or file) it came from in `daemon`.

Items stay the maps the daemons sent (or files hold), not reply classes: `--json` prints
them as they are, with `daemon`, a held `label` and any field a newer daemon adds, and a
line of a file need only hold what these functions read. The commands read them as reply
classes (`run_table.typed`) only to show them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from runnerd.mirror_format import SILENT_AFTER

Item = dict[str, Any]

GROUP_FIELDS = {"class": "failure_class", "signature": "signature", "category": "category"}
GROUP_EXAMPLES = 5
# Keys `runnerctl export` adds to a failure line for other tools; not part of the record.
EXPORT_ONLY_KEYS = ("timestamp", "details")


def tag(items: Iterable[Item], daemon: str) -> list[Item]:
    """Name the daemon each item came from."""
    return [{**item, "daemon": daemon} for item in items]


def when(ts: str | None) -> float:
    """An ISO 8601 time (the daemons write `...Z`) as epoch seconds; none sorts first."""
    return datetime.fromisoformat(ts).timestamp() if ts else 0.0


def _last_heard(run: Item) -> float:
    return max(
        when(run.get(key)) for key in ("created_at", "started_at", "last_heartbeat_at", "ended_at")
    )


def _dedupe(items: Iterable[Item], fresher: Callable[[Item], float]) -> list[Item]:
    """One item per run_id: the freshest copy, the first of equals."""
    best: dict[str, Item] = {}
    for item in items:
        kept = best.get(item["run_id"])
        if kept is None or fresher(item) > fresher(kept):
            best[item["run_id"]] = item
    return list(best.values())


def merge_runs(runs: Iterable[Item], limit: int | None = None) -> list[Item]:
    """Runs of every daemon, once each, newest first; `limit` applies to the merged list."""
    merged = sorted(
        _dedupe(runs, _last_heard), key=lambda r: (when(r["created_at"]), r["run_id"]), reverse=True
    )
    return merged[:limit]


def merge_failures(records: Iterable[Item], limit: int | None = None) -> list[Item]:
    """Failure records (one per run), newest first."""
    return sorted(_dedupe(records, _failed_at), key=_failed_at, reverse=True)[:limit]


def _failed_at(record: Item) -> float:
    return when(record["at"])


def merge_groups(groups: Iterable[Item], limit: int | None = None) -> list[Item]:
    """Groups of the same key added up: counts summed, first/last seen widened, run_ids
    (newest groups first, up to 5) and the newest example kept, `daemons` listed."""
    merged: dict[str, Item] = {}
    for group in sorted(groups, key=lambda g: when(g["last_seen"]), reverse=True):
        into = merged.get(group["key"])
        if into is None:
            merged[group["key"]] = {
                **{k: v for k, v in group.items() if k != "daemon"},
                "run_ids": list(group["run_ids"]),
                "daemons": [group["daemon"]],
            }
            continue
        into["count"] += group["count"]
        into["first_seen"] = min(into["first_seen"], group["first_seen"], key=when)
        into["run_ids"] += [r for r in group["run_ids"] if r not in into["run_ids"]]
        del into["run_ids"][GROUP_EXAMPLES:]
        if group["daemon"] not in into["daemons"]:
            into["daemons"].append(group["daemon"])
    ranked = sorted(merged.values(), key=lambda g: (g["count"], when(g["last_seen"])), reverse=True)
    return ranked[:limit]


def group_failures(records: Iterable[Item], group_by: str, limit: int | None = None) -> list[Item]:
    """Failure records grouped as a daemon groups them (`failures --group-by`)."""
    field = GROUP_FIELDS[group_by]
    return merge_groups(
        (
            {
                "key": record.get(field) or "unknown",
                "count": 1,
                "first_seen": record["at"],
                "last_seen": record["at"],
                "run_ids": [record["run_id"]],
                "daemon": record["daemon"],
                "example": {"failure_class": record["failure_class"], "message": record["message"]},
            }
            for record in records
        ),
        limit,
    )


def total_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Counts by state of several daemons, added."""
    total: dict[str, int] = {}
    for one in counts:
        for state, n in one.items():
            total[state] = total.get(state, 0) + n
    return total


def counts_once(runs: Sequence[Mapping[str, Mapping[str, str]]]) -> dict[str, int] | None:
    """Counts by state of several daemons' runs (each daemon's `status` `runs`: by state,
    its run ids, space-joined), a run two of them know counted once, in the state of the
    copy `merge_runs` keeps: heard from last, the first of equals. None when a run is
    known twice and the times each daemon last heard of its runs (`heard`) were not sent:
    only those runs are then looked at one by one."""
    listings = [{state: one["ids"].split() for state, one in daemon.items()} for daemon in runs]
    counts = total_counts({state: len(ids) for state, ids in one.items()} for one in listings)
    if _disjoint([list(listing.values()) for listing in listings]):
        return {state: n for state, n in counts.items() if n}
    if not all("heard" in one for daemon in runs for one in daemon.values()):
        return None
    seen: set[str] = set()
    twice: set[str] = set()
    for listing in listings:
        mine = set().union(*listing.values())
        twice |= seen & mine
        seen |= mine
    kept: dict[str, tuple[int, str]] = {}  # run_id -> (heard, state) of the copy kept
    for daemon, listing in zip(runs, listings, strict=True):
        for state, ids in listing.items():
            if twice.isdisjoint(ids):
                continue
            for run_id, at in zip(ids, daemon[state]["heard"].split(), strict=True):
                if run_id in twice:
                    counts[state] -= 1
                    heard = int(at)
                    if run_id not in kept or heard > kept[run_id][0]:
                        kept[run_id] = (heard, state)
    for _, state in kept.values():
        counts[state] += 1
    return {state: n for state, n in counts.items() if n}


def _disjoint(listings: Sequence[list[list[str]]]) -> bool:
    """Whether no id is in two listings (each of one daemon, whose ids are distinct):
    each is looked up in a set of those before it, the last one never added to it."""
    seen: set[str] = set()
    for n, listing in enumerate(listings):
        if any(not seen.isdisjoint(ids) for ids in listing):
            return False
        if n < len(listings) - 1:
            for ids in listing:
                seen.update(ids)
    return True


def filter_runs(
    runs: Iterable[Item], *, state: str | None, experiment: str | None, since: float | None
) -> list[Item]:
    """What `list` asks a daemon to keep, applied to runs read from files."""
    return [
        r
        for r in runs
        if (state is None or r["state"] == state)
        and (experiment is None or r["experiment"] == experiment)
        and (since is None or when(r["created_at"]) >= since)
    ]


def filter_failures(
    records: Iterable[Item], *, experiment: str | None, since: float | None
) -> list[Item]:
    """What `failures` asks a daemon to keep, applied to records read from files."""
    return [
        f
        for f in records
        if (experiment is None or f["experiment"] == experiment)
        and (since is None or when(f["at"]) >= since)
    ]


def failures_of_runs(runs: Iterable[Item]) -> list[Item]:
    """The failure record each failed run carries, as `failures` lists it."""
    return [
        {
            **run["failure"],
            "run_id": run["run_id"],
            "experiment": run["experiment"],
            "variation": run["variation"],
            "host": run.get("host"),
            "daemon": run["daemon"],
        }
        for run in runs
        if run.get("failure")
    ]


# --- export files -------------------------------------------------------------


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _time(value: Any) -> bool:
    try:
        return isinstance(value, str) and bool(datetime.fromisoformat(value))
    except ValueError:
        return False


def _maybe(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# What the tables, filters and merges read from a line: checked, so a bad line is skipped
# with a warning instead of failing the whole listing.
_FAILURE = {
    "failure_class": _text,
    "message": _text,
    "reason": _text,
    "signature": _text,
    "category": _maybe(_text),
    "at": _time,
}
_RESOURCES = {"peak_rss_bytes": _number, "cpu_seconds": _number, "limit_bytes": _number}
_RUN = {
    "run_id": _text,
    "experiment": _text,
    "variation": _text,
    "state": _text,
    "attempt": _maybe(lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "host": _maybe(_text),
    "created_at": _time,
    "started_at": _maybe(_time),
    "ended_at": _maybe(_time),
    "last_heartbeat_at": _maybe(_time),
    "failure": _maybe(lambda v: _bad_field(v, _FAILURE) is None),
    "resources": _maybe(lambda v: _bad_field(v, _RESOURCES) is None),
}
_FAILURE_LINE = {**_FAILURE, "run_id": _text, "experiment": _text, "host": _maybe(_text)}


def _bad_field(obj: Any, fields: Mapping[str, Callable[[Any], bool]]) -> str | None:
    if not isinstance(obj, dict):
        return "the object itself"
    return next((name for name, check in fields.items() if not check(obj.get(name))), None)


def parse_mirrored(
    name: str, lines: Iterable[tuple[str, int, str]]
) -> tuple[list[Item], list[str]]:
    """The runs of one mirrored node (lines as (file, number, text), in the order written)
    and warnings. A later line of a run replaces an earlier one: the journal's order, not
    the run's times, says which is newer (a label changes no time)."""
    runs: dict[str, Item] = {}
    warnings: list[str] = []
    for file, number, line in lines:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            warnings.append(f"{file}:{number}: not JSON, skipped")
            continue
        if (bad := _bad_field(obj, _RUN)) is not None:
            warnings.append(f"{file}:{number}: bad or missing {bad!r}, skipped")
            continue
        runs.pop(obj["run_id"], None)
        runs[obj["run_id"]] = {**obj, "daemon": name}
    return list(runs.values()), warnings


def node_state(header: Mapping[str, Any], now: float, gone: bool | None) -> Item:
    """What a mirrored node's node.json says about it: `stopped` (its daemon flushed and
    said so), `live` (refreshed lately) or `silent` (neither: killed, or its node gone),
    and for a silent one what may be missing. `gone`: whether its daemon is known dead
    (None where that cannot be told, on another host)."""
    refreshed = when(header.get("refreshed_at"))
    heartbeat = float(header.get("heartbeat") or 30.0)
    if header.get("stopped_at"):
        state = "stopped"
    elif gone or (gone is None and now - refreshed > SILENT_AFTER * heartbeat):
        state = "silent"
    else:
        state = "live"
    missing = None
    if state == "silent":
        pending = int(header.get("pending") or 0)
        missing = (
            f"what changed after {header.get('refreshed_at')} is missing: at most the "
            f"last {float(header.get('interval') or 1.0):g} s of changes"
            + (f", and {pending} run(s) that were then waiting to be written" if pending else "")
        )
    return {
        "state": state,
        "missing": missing,
        **{
            key: header.get(key)
            for key in (
                "host",
                "pid",
                "socket",
                "db",
                "started_at",
                "refreshed_at",
                "stopped_at",
                "pending",
            )
        },
    }


def distinct_counts(runs: Iterable[Item]) -> dict[str, int]:
    """Counts by state of runs merged by run_id (a run two sources know counts once)."""
    counts: dict[str, int] = {}
    for run in merge_runs(runs):
        counts[run["state"]] = counts.get(run["state"], 0) + 1
    return counts


def parse_export(name: str, lines: Iterable[str]) -> tuple[list[Item], list[Item], list[str]]:
    """Runs, failure records and warnings from the lines of a `runnerctl export` file.

    A line with `state` is a run, one with `failure_class` a failure record; any other
    line, or one missing a field or holding a wrong type, is skipped with a warning.
    """
    runs: list[Item] = []
    records: list[Item] = []
    warnings: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            warnings.append(f"{name}:{number}: not JSON, skipped")
            continue
        is_run = isinstance(obj, dict) and "state" in obj
        if not is_run and not (isinstance(obj, dict) and "failure_class" in obj):
            warnings.append(f"{name}:{number}: neither a run nor a failure record, skipped")
        elif (bad := _bad_field(obj, _RUN if is_run else _FAILURE_LINE)) is not None:
            warnings.append(f"{name}:{number}: bad or missing {bad!r}, skipped")
        elif is_run:
            runs.append({**obj, "daemon": name})
        else:
            records.append(
                {**{k: v for k, v in obj.items() if k not in EXPORT_ONLY_KEYS}, "daemon": name}
            )
    return runs, records, warnings
