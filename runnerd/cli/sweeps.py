"""Sweeps: run a grid as launched runs, resume what did not succeed, replicate, inspect;
and `resume --interrupted` for the work a crash of runnerd or the machine cut short.

The commands parse and print: the cells are read by `runnerd.cli.sweep_spec`, the turns
run by `runnerd.cli.sweep_turns` over `runnerd.cli.sweep_driver` (through the client's sweep
engine), the relaunch is `runnerd.cli.relaunch`'s.
"""

from __future__ import annotations

import os
import sys

import click

from runnerd.cli.common import (
    EXIT_ERROR,
    EXIT_USAGE,
    choice,
    cli,
    emit_json,
    fail,
    json_option,
    local_time,
    parse_size,
    parse_timeout,
    request,
    retry_options,
    say,
    shown,
    table,
)
from runnerd.cli.run_table import typed
from runnerd.cli.sweep_spec import cells_spec, checked_cells
from runnerd.cli.sweep_turns import (
    connect,
    counts_text,
    replicate,
    resume_sweep,
    start_sweep,
    stored_sweep,
)
from runnerd_client.cells import differences
from runnerd_client.protocol import ListRuns, SweepList, SweepPolicy
from runnerd_client.replies import CellInfo, SweepInfo

POLICIES = choice(SweepPolicy)
MANIFEST_KEYS = (
    "sweep_id",
    "experiment",
    "failure_policy",
    "spec",
    "created_at",
    "ended_at",
    "status",
)


dask_option = click.option(
    "--dask",
    metavar="ADDRESS",
    help="Run the cells on the Dask cluster whose scheduler is at ADDRESS.",
)


@cli.group()
def sweep() -> None:
    """Run a grid of experiments as tracked runs; resume, replicate and inspect it."""


@sweep.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--experiment", required=True, help="The experiment every cell belongs to.")
@click.option(
    "--grid",
    multiple=True,
    metavar="K=V1,V2,...",
    help="A parameter and its values (V1,V2,... or a JSON list); several make a Cartesian product.",
)
@click.option(
    "--grid-file",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON or TOML: a list of cells, or a map of value lists.",
)
@click.option(
    "--jobs",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Cells running at once.",
)
@click.option(
    "--failure-policy", type=POLICIES, default=SweepPolicy.FAIL_FAST.value, show_default=True
)
@retry_options
@click.option("--timeout", type=parse_timeout, help="Per cell: TERM, then KILL, after this.")
@click.option("--memory", type=parse_size, help="Per cell: a memory cgroup limited to this.")
@click.option(
    "--folder",
    type=click.Path(file_okay=False, resolve_path=True),
    help="Where manifest.json goes (default: the data dir's sweeps/<id>/).",
)
@dask_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def sweep_run(
    ctx: click.Context,
    experiment: str,
    grid: tuple[str, ...],
    grid_file: str | None,
    jobs: int,
    failure_policy: str,
    retries: int,
    backoff: float,
    retry_on: str,
    timeout: float | None,
    memory: int | None,
    folder: str | None,
    dask: str | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND once per cell, `{name}` standing for the cell's value of name."""
    spec = {
        "kind": "command",
        "command": list(command),
        "cwd": os.getcwd(),
        **cells_spec(grid, grid_file),
        "jobs": jobs,
        "retries": retries,
        "backoff": backoff,
        "retry_on": retry_on,
        "timeout": timeout,
        "memory": memory,
    }
    cells = checked_cells(spec)
    sys.exit(start_sweep(ctx, experiment, spec, cells, failure_policy, folder, dask))


@sweep.command("resume", context_settings={"ignore_unknown_options": True})
@click.argument("sweep_ref", metavar="SWEEP")
@click.option(
    "--grid",
    multiple=True,
    metavar="K=V1,V2,...",
    help="Given again, it must equal the stored grid.",
)
@click.option("--grid-file", type=click.Path(exists=True, dir_okay=False))
@click.option("--jobs", type=click.IntRange(1, 256), help="Default: as stored.")
@click.option("--failure-policy", type=POLICIES, help="Default: as stored.")
@dask_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def sweep_resume(
    ctx: click.Context,
    sweep_ref: str,
    grid: tuple[str, ...],
    grid_file: str | None,
    jobs: int | None,
    failure_policy: str | None,
    dask: str | None,
    command: tuple[str, ...],
) -> None:
    """Run the cells whose latest attempt did not succeed, each from its last checkpoint."""
    conn = connect(ctx)
    stored = stored_sweep(conn, sweep_ref)
    given = {"command": list(command) or None, **cells_spec(grid, grid_file)}
    changed = differences(stored["spec"], given)
    if changed:
        fail(
            "refused: this is not the stored sweep; nothing was run.\n" + "\n".join(changed),
            EXIT_USAGE,
        )
    conn.close()
    sys.exit(resume_sweep(ctx, stored, jobs, failure_policy, dask))


@sweep.command("replicate")
@click.argument("sweep_ref", metavar="SWEEP")
@click.option("--failed-only", is_flag=True, help="Only the cells that failed.")
@click.option("--jobs", type=click.IntRange(1, 256), help="Default: as stored.")
@click.pass_context
def sweep_replicate(
    ctx: click.Context, sweep_ref: str, failed_only: bool, jobs: int | None
) -> None:
    """Run cells again and check each ends as recorded: succeeded again, or failed with the
    same failure class and signature. The replication is a record of its own (a report
    beside the manifest); the sweep's outcomes stay as they were. Exit 1 on any difference."""
    from runnerd.cli.replicate import recorded_cells
    from runnerd_client.sweep_record import sweep_cells

    conn = connect(ctx)
    stored = stored_sweep(conn, sweep_ref)
    recorded = recorded_cells(sweep_cells(conn, stored["sweep_id"]), failed_only)
    conn.close()
    if not recorded:
        fail("no cell has a recorded outcome to replicate", EXIT_ERROR)
    sys.exit(replicate(ctx, stored, recorded, jobs))


@sweep.command("list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@json_option
@click.pass_context
def sweep_list(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Sweeps, newest first, with their cells' counts."""
    sweeps = request(ctx, SweepList(limit=limit))["sweeps"]
    if as_json:
        emit_json(sweeps)
        return
    if not sweeps:
        say("no sweeps")
        return
    listed = [typed(SweepInfo, one, f"sweep_list.sweeps[{n}]") for n, one in enumerate(sweeps)]
    say(
        table(
            (
                "SWEEP",
                "EXPERIMENT",
                "STATUS",
                "POLICY",
                "CELLS",
                "OK",
                "FAILED",
                "ABANDONED",
                "SKIPPED",
                "RUNNING",
                "CREATED",
            ),
            [
                (
                    s.sweep_id,
                    s.experiment,
                    s.status,
                    s.failure_policy,
                    s.cells_summary["total"],
                    s.cells_summary["succeeded"],
                    s.cells_summary["failed"],
                    s.cells_summary["abandoned"],
                    s.cells_summary["skipped"],
                    s.cells_summary["running"],
                    local_time(s.created_at),
                )
                for s in listed
            ],
        )
    )


@sweep.command("show")
@click.argument("sweep_ref", metavar="SWEEP")
@json_option
@click.pass_context
def sweep_show(ctx: click.Context, sweep_ref: str, as_json: bool) -> None:
    """One sweep and its cells (--json: the shape of its manifest.json)."""
    from runnerd_client.sweep_record import sweep_cells as cells

    conn = connect(ctx)
    stored = stored_sweep(conn, sweep_ref)
    all_cells = list(cells(conn, stored["sweep_id"]))
    if as_json:
        emit_json(
            {
                **{k: stored[k] for k in MANIFEST_KEYS},
                "cells": all_cells,
                "cells_summary": stored["cells_summary"],
            }
        )
        return
    _show_sweep(
        typed(SweepInfo, stored, "sweep_get.sweep"),
        [typed(CellInfo, c, f"sweep_cells.cells[{n}]") for n, c in enumerate(all_cells)],
    )


def _show_sweep(stored: SweepInfo, cells: list[CellInfo]) -> None:
    spec = stored.spec
    what = " ".join(spec["command"]) if "command" in spec else spec.get("function", "?")
    say(
        f"sweep {stored.sweep_id} of {shown(stored.experiment)}: {stored.status},"
        f" {stored.failure_policy}\nruns     {what}"
        f"\nmanifest {stored.manifest}\ncells    {counts_text(stored.cells_summary)}"
    )
    say(
        table(
            ("CELL", "VARIATION", "STATE", "ATTEMPTS", "RUN", "FAILURE"),
            [
                (
                    c.index,
                    c.variation,
                    c.state,
                    c.attempts,
                    c.run_id or "-",
                    f"{c.failure.failure_class}: {c.failure.message}" if c.failure else "",
                )
                for c in cells
            ],
        )
    )


@cli.command("resume")
@click.option(
    "--interrupted",
    is_flag=True,
    required=True,
    help="Relaunch the runs (and sweeps) a crash of runnerd or the machine cut short.",
)
@click.option("--dry-run", is_flag=True, help="Only say what would be relaunched.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
@click.pass_context
def resume(ctx: click.Context, interrupted: bool, dry_run: bool, as_json: bool) -> None:
    """Relaunch interrupted launched runs from their last checkpoints, and resume the sweeps
    they belong to."""
    from runnerd.cli.relaunch import Interrupted, relaunch

    if as_json and not dry_run:
        raise click.UsageError("--json goes with --dry-run")
    found = Interrupted.of(request(ctx, ListRuns(interrupted=True, limit=10_000))["runs"])
    if as_json:
        emit_json(found.plan())
        return
    for r in found.others:
        say(
            f"{r['run_id']} {shown(r['experiment'])}/{shown(r['variation'])}: interrupted, but not"
            " launched by runnerctl; rerun it yourself (with resume=True)"
        )
    for r in found.launched:
        say(
            f"{r['run_id']} {shown(r['experiment'])}/{shown(r['variation'])}: relaunch"
            f" {' '.join(r['launch']['command'])}"
        )
    for sweep_id in found.sweeps:
        say(f"sweep {sweep_id}: resume its unfinished cells")
    if dry_run:
        return
    codes = relaunch(ctx.obj["socket"], found.launched, say)
    for sweep_id in found.sweeps:
        conn = connect(ctx)
        stored = stored_sweep(conn, sweep_id)
        conn.close()
        codes.append(resume_sweep(ctx, stored, None, None))
    sys.exit(max(codes, default=0) and 1)
