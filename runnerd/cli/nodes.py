"""One view over many nodes: `runnerctl --socket A --socket B ...` asks every daemon, and
`--from DIR` reads `runnerctl export` files as if each were a daemon (SPEC §9).

A daemon that cannot be reached is named on stderr and left out; only when none answers
does a command exit 3.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from runnerd.cli.common import EXIT_ERROR, EXIT_NO_RUN, EXIT_UNREACHABLE, fail, say, shown
from runnerd.cli.merge import (
    Item,
    failures_of_runs,
    filter_failures,
    filter_runs,
    group_failures,
    merge_failures,
    merge_groups,
    merge_runs,
    parse_export,
    tag,
)
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.protocol import ErrorCode, Failures, Get, ListRuns, Request, RunnerdError

from_option = click.option(
    "--from", "from_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Read the `runnerctl export` files (*.jsonl) in DIR instead of asking daemons.")


@dataclass(frozen=True, slots=True)
class Answer:
    """One daemon's reply to a request, or why there is none."""

    daemon: str
    body: dict[str, Any] | None = None
    error: RunnerdError | None = None

    @property
    def unreachable(self) -> bool:
        return isinstance(self.error, DaemonUnavailable)


def several(ctx: click.Context) -> bool:
    """Whether the command was given more than one daemon."""
    return len(ctx.obj["sockets"]) > 1


def _ask(path: Path, req: Request) -> Answer:
    try:
        conn = Connection(path)
        try:
            body = conn.call(req)
        finally:
            conn.close()
    except RunnerdError as exc:
        return Answer(str(path), error=exc)
    return Answer(str(path), body={k: v for k, v in body.items() if k not in ("id", "ok")})


def ask_each(ctx: click.Context, req: Request) -> list[Answer]:
    """Every daemon's answer, asked at once (a forwarded socket may be slow), in --socket order."""
    sockets: list[Path] = ctx.obj["sockets"]
    with ThreadPoolExecutor(max_workers=len(sockets)) as pool:
        return list(pool.map(lambda path: _ask(path, req), sockets))


def warn_unreachable(answers: list[Answer]) -> None:
    for answer in answers:
        if isinstance(answer.error, DaemonUnavailable):
            say(f"runnerctl: warning: {answer.error.message}; left out", err=True)


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


def read_exports(folder: Path) -> tuple[list[Item], list[Item]]:
    """Runs and failure records of every *.jsonl file in `folder`, each named by its file;
    malformed lines are warned about on stderr and skipped."""
    files = sorted(p for p in folder.glob("*.jsonl") if p.is_file())
    if not files:
        fail(f"no export files (*.jsonl) in {folder}", EXIT_ERROR)
    runs: list[Item] = []
    records: list[Item] = []
    for path in files:
        try:
            with path.open(encoding="utf-8", errors="replace") as lines:
                got_runs, got_records, warnings = parse_export(str(path), lines)
        except OSError as exc:
            say(f"runnerctl: warning: cannot read {shown(path)}: {exc.strerror}; skipped",
                err=True)
            continue
        for warning in warnings:
            say(f"runnerctl: warning: {shown(warning)}", err=True)
        runs += got_runs
        records += got_records
    return runs, records


def list_many(ctx: click.Context, req: ListRuns, folder: Path | None) -> list[Item]:
    """`list` over several daemons, or over the export files in `folder`."""
    if folder is None:
        return merge_runs((run for daemon, body in gather(ctx, req)
                           for run in tag(body["runs"], daemon)), req.limit)
    if req.sweep is not None:
        raise click.UsageError("--sweep needs a daemon; it cannot be used with --from")
    runs, _ = read_exports(folder)
    return merge_runs(filter_runs(runs, state=req.state, experiment=req.experiment,
                                  since=req.since), req.limit)


def failures_many(ctx: click.Context, req: Failures, folder: Path | None) -> list[Item]:
    """`failures` (records or groups) over several daemons, or over the files in `folder`."""
    if folder is None:
        field = "groups" if req.group_by else "failures"
        rows = [row for daemon, body in gather(ctx, req) for row in tag(body[field], daemon)]
        return merge_groups(rows, req.limit) if req.group_by else merge_failures(rows, req.limit)
    runs, records = read_exports(folder)
    # A run's own failure comes first: of equal copies the first is kept, and it has a host.
    merged = merge_failures(filter_failures([*failures_of_runs(runs), *records],
                                            experiment=req.experiment, since=req.since))
    return group_failures(merged, req.group_by, req.limit) if req.group_by \
        else merged[:req.limit]


def show_many(ctx: click.Context, prefix: str) -> Item:
    """The one run matching `prefix` on any daemon; on two daemons it is ambiguous."""
    answers = ask_each(ctx, Get(run=prefix))
    warn_unreachable(answers)
    for answer in answers:
        if answer.error is not None and not answer.unreachable \
                and answer.error.code != ErrorCode.UNKNOWN_RUN:
            fail(f"{answer.daemon}: {answer.error.message}", EXIT_ERROR)
    found = merge_runs(run for answer in answers if answer.body is not None
                       for run in tag([answer.body["run"]], answer.daemon))
    if len(found) > 1:
        fail(f"{prefix!r} matches more than one run: "
             + ", ".join(f"{r['run_id']} on {r['daemon']}" for r in found), EXIT_ERROR)
    if found:
        return found[0]
    if any(a.unreachable for a in answers):
        fail(f"no reachable daemon has a run matching {prefix!r}", EXIT_UNREACHABLE)
    fail(f"no run matches {prefix!r} on any of the {len(answers)} daemons", EXIT_NO_RUN)
