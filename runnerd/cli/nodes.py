"""One view over many nodes: `runnerctl --socket A --socket B ...` asks every daemon, and
`--from DIR` reads a shared folder as if each file or node in it were a daemon: the nodes
that daemons mirror there (runnerd.mirror_format), live or gone, and `runnerctl export`
files (SPEC §9, §10).

A daemon that cannot be reached is named on stderr and left out; only when none answers
does a command exit 3.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from runnerd.cli import dask_nodes
from runnerd.cli.common import EXIT_ERROR, EXIT_NO_RUN, EXIT_UNREACHABLE, fail, say, shown
from runnerd.cli.daemons import Answer, ask_sockets, warn_unreachable
from runnerd.cli.labels import join_records, join_runs, unshown
from runnerd.cli.merge import (
    Item,
    distinct_counts,
    failures_of_runs,
    filter_failures,
    filter_runs,
    group_failures,
    merge_failures,
    merge_groups,
    merge_runs,
    node_state,
    parse_export,
    parse_mirrored,
    tag,
)
from runnerd.mirror_format import NotMirrored, is_node, read_node
from runnerd_client.protocol import ErrorCode, Failures, Get, ListRuns, Request

from_option = click.option(
    "--from",
    "from_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Read DIR instead of asking daemons: the nodes mirrored there (runnerd --mirror) "
    "and `runnerctl export` files (*.jsonl).",
)


def several(ctx: click.Context) -> bool:
    """Whether the command was given more than one daemon (or a Dask cluster's)."""
    return len(ctx.obj["sockets"]) > 1 or bool(ctx.obj.get("dask"))


def ask_each(ctx: click.Context, req: Request) -> list[Answer]:
    """Every daemon's answer, in --socket order; with --dask, every node's through the
    cluster."""
    if ctx.obj.get("dask"):
        return dask_nodes.ask_each(ctx, req)
    return ask_sockets(ctx.obj["sockets"], req)


def gather(ctx: click.Context, req: Request) -> list[tuple[str, dict[str, Any]]]:
    """(daemon, reply) of the daemons that answered. One that knows no such sweep has
    nothing to add; other errors stop the command, as they would with one daemon."""
    answers = ask_each(ctx, req)
    warn_unreachable(answers)
    if all(a.unreachable for a in answers):
        fail("no daemon is reachable", EXIT_UNREACHABLE)
    errors = [(a.daemon, a.error) for a in answers if a.error is not None and not a.unreachable]
    for daemon, error in errors:
        if error.code != ErrorCode.UNKNOWN_RUN:
            fail(f"{daemon}: {error.message}", EXIT_ERROR)
    answered = [(a.daemon, a.body) for a in answers if a.body is not None]
    if not answered:
        fail(errors[0][1].message, EXIT_NO_RUN)
    return answered


@dataclass
class Folder:
    """What `--from DIR` holds: runs and failure records, and each source they came from
    (an export file, or a mirrored node with what its node.json says)."""

    runs: list[Item] = field(default_factory=list)
    records: list[Item] = field(default_factory=list)
    sources: list[Item] = field(default_factory=list)
    quiet: bool = False

    def warn(self, text: str) -> None:
        if not self.quiet:
            say(f"runnerctl: warning: {shown(text)}", err=True)


def read_folder(folder: Path, quiet: bool = False) -> Folder:
    """Every export file (*.jsonl) and mirrored node in `folder`, each named by its path;
    malformed lines and unreadable sources are warned about on stderr (unless `quiet`) and
    skipped, and a node whose daemon did not stop cleanly is noted with what may be
    missing."""
    files = sorted(p for p in folder.glob("*.jsonl") if p.is_file())
    nodes = sorted(p for p in folder.iterdir() if p.is_dir() and is_node(p))
    if not files and not nodes:
        fail(f"no mirrored nodes or export files (*.jsonl) in {folder}", EXIT_ERROR)
    got = Folder(quiet=quiet)
    for path in files:
        _read_export(path, got)
    for path in nodes:
        _read_mirrored(path, got)
    return got


def _read_export(path: Path, got: Folder) -> None:
    try:
        with path.open(encoding="utf-8", errors="replace") as lines:
            runs, records, warnings = parse_export(str(path), lines)
    except OSError as exc:
        got.warn(f"cannot read {path}: {exc.strerror}; skipped")
        return
    for warning in warnings:
        got.warn(warning)
    got.runs += runs
    got.records += records
    got.sources.append(
        {"daemon": str(path), "kind": "export", "node": None, "counts": distinct_counts(runs)}
    )


def _read_mirrored(path: Path, got: Folder) -> None:
    try:
        node = read_node(path)
    except (NotMirrored, OSError) as exc:
        got.warn(f"{exc}; skipped")
        return
    runs, warnings = parse_mirrored(str(path), node.lines)
    for warning in warnings:
        got.warn(warning)
    state = node_state(node.header, time.time(), _gone(node.header))
    if state["missing"] and not got.quiet:
        say(
            f"runnerctl: note: {shown(path)} ({shown(state['host'])}) did not stop cleanly; "
            f"{shown(state['missing'])}",
            err=True,
        )
    got.runs += runs
    got.sources.append(
        {"daemon": str(path), "kind": "mirror", "node": state, "counts": distinct_counts(runs)}
    )


def _gone(header: dict[str, Any]) -> bool | None:
    """True if the node's daemon is known to be dead: that can be told only on its host."""
    pid = header.get("pid")
    if header.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return None
    return None


def list_many(ctx: click.Context, req: ListRuns, folder: Path | None) -> list[Item]:
    """`list` over several daemons, or over the export files in `folder`."""
    if folder is None:
        return _joined(
            ctx,
            merge_runs(
                (run for daemon, body in gather(ctx, req) for run in tag(body["runs"], daemon)),
                req.limit,
            ),
            join_runs,
        )
    if req.sweep is not None:
        raise click.UsageError("--sweep needs a daemon; it cannot be used with --from")
    return _joined(
        ctx,
        merge_runs(
            filter_runs(
                read_folder(folder).runs,
                state=req.state,
                experiment=req.experiment,
                since=req.since,
            ),
            req.limit,
        ),
        join_runs,
    )


def failures_many(ctx: click.Context, req: Failures, folder: Path | None) -> list[Item]:
    """`failures` (records or groups) over several daemons, or over the files in `folder`."""
    if folder is None:
        field = "groups" if req.group_by else "failures"
        rows = [row for daemon, body in gather(ctx, req) for row in tag(body[field], daemon)]
        if req.group_by:
            return _joined(ctx, merge_groups(rows, req.limit), None)
        return _joined(ctx, merge_failures(rows, req.limit), join_records)
    got = read_folder(folder)
    # A run's own failure comes first: of equal copies the first is kept, and it has a host.
    merged = merge_failures(
        filter_failures(
            [*failures_of_runs(got.runs), *got.records], experiment=req.experiment, since=req.since
        )
    )
    if req.group_by:
        return _joined(ctx, group_failures(merged, req.group_by, req.limit), None)
    return _joined(ctx, merged[: req.limit], join_records)


def show_many(ctx: click.Context, prefix: str) -> Item:
    """The one run matching `prefix` on any daemon; on two daemons it is ambiguous."""
    answers = ask_each(ctx, Get(run=prefix))
    warn_unreachable(answers)
    for answer in answers:
        if (
            answer.error is not None
            and not answer.unreachable
            and answer.error.code != ErrorCode.UNKNOWN_RUN
        ):
            fail(f"{answer.daemon}: {answer.error.message}", EXIT_ERROR)
    found = merge_runs(
        run
        for answer in answers
        if answer.body is not None
        for run in tag([answer.body["run"]], answer.daemon)
    )
    if len(found) > 1:
        fail(
            f"{prefix!r} matches more than one run: "
            + ", ".join(f"{r['run_id']} on {r['daemon']}" for r in found),
            EXIT_ERROR,
        )
    if found:
        return _joined(ctx, found, join_runs)[0]
    labels = _held(ctx)
    if held := [label for run_id, label in labels.items() if run_id.startswith(prefix)]:
        fail(
            f"{held[0]['run_id']} lived on node {held[0]['node']}, which has no live worker to "
            f"ask its daemon; the Dask scheduler holds its label {held[0]['category']}: "
            f"{held[0]['note']}",
            EXIT_UNREACHABLE,
        )
    if any(a.unreachable for a in answers):
        fail(f"no reachable daemon has a run matching {prefix!r}", EXIT_UNREACHABLE)
    fail(f"no run matches {prefix!r} on any of the {len(answers)} daemons", EXIT_NO_RUN)


def _held(ctx: click.Context) -> dict[str, Item]:
    """With --dask, the labels the scheduler holds for runs whose node has no live worker."""
    return dask_nodes.held_labels(ctx) if ctx.obj.get("dask") else {}


def _joined(
    ctx: click.Context,
    items: list[Item],
    join: Callable[[list[Item], dict[str, Item]], list[Item]] | None,
) -> list[Item]:
    """Runs or failure records (or groups: `join` None) with the labels the scheduler holds
    joined, and the nodes it holds labels for, which cannot be asked, named on stderr
    (once a command)."""
    labels = _held(ctx)
    if not labels:
        return items
    if not ctx.obj.get("held_noted"):
        ctx.obj["held_noted"] = True
        ids = (run_id for item in items for run_id in item.get("run_ids", [item.get("run_id")]))
        for line in unshown(labels, ids):
            say(f"runnerctl: note: {shown(line)}", err=True)
    return join(items, labels) if join is not None else items


def show_from(ctx: click.Context, folder: Path, prefix: str) -> Item:
    """The one run matching `prefix` in the folder (the freshest copy of it), with the label
    the Dask scheduler holds for it (--dask): a node gone overnight has its records in the
    mirror and its labels on the scheduler."""
    found = merge_runs(r for r in read_folder(folder).runs if r["run_id"].startswith(prefix))
    exact = [r for r in found if r["run_id"] == prefix]
    if len(found) > 1 and not exact:
        fail(
            f"{prefix!r} matches more than one run: "
            + ", ".join(f"{r['run_id']} in {r['daemon']}" for r in found),
            EXIT_ERROR,
        )
    if not found:
        fail(f"no run matches {prefix!r} in {folder}", EXIT_NO_RUN)
    # An export line has no history; a mirrored record has it as `show --json` gives it.
    run = {"transitions": [], "artifacts": [], "checkpoints": [], **(exact or found)[0]}
    return _joined(ctx, [run], join_runs)[0]


def diagnose_many(ctx: click.Context, req: Failures, folder: Path | None) -> list[Item]:
    """The failure records `diagnose` reads, of several daemons or of the folder, each
    once, newest first (`req.run` a run id prefix, `req.limit` applied to the merge)."""
    if folder is None:
        return merge_failures(
            (row for daemon, body in gather(ctx, req) for row in tag(body["failures"], daemon)),
            req.limit,
        )
    got = read_folder(folder)
    records = merge_failures(
        filter_failures(
            [*failures_of_runs(got.runs), *got.records], experiment=req.experiment, since=req.since
        )
    )
    if req.run is not None:
        records = [r for r in records if r["run_id"].startswith(req.run)]
        if not records and not any(r["run_id"].startswith(req.run) for r in got.runs):
            fail(f"no run matches {req.run!r} in {folder}", EXIT_NO_RUN)
    return records[: req.limit]
