"""Sweeps: run a grid as launched runs, resume what did not succeed, replicate, inspect;
and `resume --interrupted` for the work a crash of runnerd or the machine cut short."""

from __future__ import annotations

import json
import os
import sys
import threading
import tomllib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from runnerd.cli.common import (
    EXIT_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    cli,
    emit_json,
    fail,
    json_option,
    local_time,
    parse_duration,
    parse_size,
    parse_value,
    request,
    retry_options,
    say,
    shown,
    table,
)
from runnerd_client.cells import SpecError, differences, expand, placeholders
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import (
    ListRuns,
    RunnerdError,
    SweepCreate,
    SweepGet,
    SweepList,
    SweepPolicy,
    SweepStart,
)

if TYPE_CHECKING:
    from runnerd.driver import Driver, Planned, Result, Turn

POLICIES = click.Choice([p.value for p in SweepPolicy])
END_PATIENCE = 60.0
MANIFEST_KEYS = ("sweep_id", "experiment", "failure_policy", "spec", "created_at", "ended_at",
                 "status")


dask_option = click.option(
    "--dask", metavar="ADDRESS",
    help="Run the cells on the Dask cluster whose scheduler is at ADDRESS.")


@cli.group()
def sweep() -> None:
    """Run a grid of experiments as tracked runs; resume, replicate and inspect it."""


def cells_spec(grid: tuple[str, ...], grid_file: str | None) -> dict[str, Any]:
    """{"grid": ...} or {"cells": ...} from --grid K=V1,V2 options and a JSON/TOML file."""
    spec: dict[str, Any] = {}
    if grid_file:
        spec = _read_grid_file(Path(grid_file))
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise click.BadParameter(f"{item!r} is not K=V1,V2,...", param_hint="--grid")
        if "cells" in spec:
            raise click.BadParameter("a list of cells and --grid do not mix",
                                     param_hint="--grid")
        spec.setdefault("grid", {})[key] = [parse_value(v) for v in values.split(",")]
    return spec


def _read_grid_file(path: Path) -> dict[str, Any]:
    """A file of cells (a list, or {"cells": [...]}) or of a grid ({"grid": {...}} or a map
    of value lists), as JSON or, by its suffix, TOML."""
    try:
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else \
            json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--grid-file") from None
    if isinstance(data, list):
        return {"cells": data}
    if isinstance(data, dict) and ("cells" in data or "grid" in data):
        return {k: data[k] for k in ("cells", "grid") if k in data}
    return {"grid": data}


def connect(ctx: click.Context) -> Connection:
    try:
        return Connection(ctx.obj["socket"])
    except DaemonUnavailable as exc:
        fail(f"{exc.message}\n(is the daemon running? start it with `runnerd`)",
             EXIT_UNREACHABLE)


def _checked(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The spec's cells, or a usage error naming what is wrong with them."""
    try:
        cells = list(expand(spec))
    except SpecError as exc:
        raise click.UsageError(str(exc)) from None
    missing = placeholders(spec["command"]) - set().union(*(c.keys() for c in cells))
    if missing:
        raise click.UsageError(f"the command uses {', '.join(sorted(missing))},"
                               " which no cell has")
    return cells


@sweep.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--experiment", required=True, help="The experiment every cell belongs to.")
@click.option("--grid", multiple=True, metavar="K=V1,V2,...",
              help="A parameter and its values; several make a Cartesian product.")
@click.option("--grid-file", type=click.Path(exists=True, dir_okay=False),
              help="JSON or TOML: a list of cells, or a map of value lists.")
@click.option("--jobs", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Cells running at once.")
@click.option("--failure-policy", type=POLICIES, default=SweepPolicy.FAIL_FAST.value,
              show_default=True)
@retry_options
@click.option("--timeout", type=parse_duration, help="Per cell: TERM, then KILL, after this.")
@click.option("--memory", type=parse_size, help="Per cell: a memory cgroup limited to this.")
@click.option("--folder", type=click.Path(file_okay=False, resolve_path=True),
              help="Where manifest.json goes (default: the data dir's sweeps/<id>/).")
@dask_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def sweep_run(ctx: click.Context, experiment: str, grid: tuple[str, ...],
              grid_file: str | None, jobs: int, failure_policy: str, retries: int,
              backoff: float, retry_on: str, timeout: float | None, memory: int | None,
              folder: str | None, dask: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND once per cell, `{name}` standing for the cell's value of name."""
    from runnerd.driver import Planned, Turn
    from runnerd.launch import Retries

    spec = {"kind": "command", "command": list(command), "cwd": os.getcwd(),
            **cells_spec(grid, grid_file), "jobs": jobs, "retries": retries,
            "backoff": backoff, "retry_on": retry_on, "timeout": timeout, "memory": memory}
    cells = _checked(spec)
    sweep_id = new_run_id()
    conn = connect(ctx)
    try:
        conn.call(SweepCreate(key=new_key(), sweep_id=sweep_id, experiment=experiment,
                              spec=spec, failure_policy=failure_policy, folder=folder))
        stored = conn.call(SweepGet(sweep=sweep_id))["sweep"]
    except RunnerdError as exc:
        fail(f"{exc.code}: {exc.message}", EXIT_ERROR)
    conn.close()
    if dask:
        sys.exit(on_dask(dask, stored, [(i, c, None) for i, c in enumerate(cells)],
                         resume=False))
    turn = Turn(stored, jobs, failure_policy, Retries(retries, backoff, retry_on))
    sys.exit(drive(ctx, turn, [Planned(i, c) for i, c in enumerate(cells)]))


def counts_text(summary: dict[str, int]) -> str:
    """A cells summary as `3 succeeded, 1 failed of 4`."""
    return ", ".join(f"{n} {state}" for state, n in summary.items()
                     if n and state != "total") + f" of {summary['total']}"


def _stored(conn: Connection, ref: str) -> dict[str, Any]:
    try:
        sweep_obj: dict[str, Any] = conn.call(SweepGet(sweep=ref))["sweep"]
    except RunnerdError as exc:
        fail(exc.message, EXIT_ERROR)
    return sweep_obj


def _turn(sweep_obj: dict[str, Any], jobs: int | None, policy: str | None,
          resume: bool = False) -> Turn:
    from runnerd.driver import Turn
    from runnerd.launch import Retries

    spec = sweep_obj["spec"]
    return Turn(sweep_obj, jobs or spec.get("jobs") or 1, policy or sweep_obj["failure_policy"],
                Retries(spec.get("retries", 0), spec.get("backoff", 2.0),
                        spec.get("retry_on", "retryable")), resume=resume)


def take_over(conn: Connection, sweep_id: str) -> None:
    try:
        conn.call(SweepStart(key=new_key(), sweep_id=sweep_id))
    except RunnerdError as exc:
        fail(f"{exc.code}: {exc.message}", EXIT_ERROR)


@sweep.command("resume", context_settings={"ignore_unknown_options": True})
@click.argument("sweep_ref", metavar="SWEEP")
@click.option("--grid", multiple=True, metavar="K=V1,V2,...",
              help="Given again, it must equal the stored grid.")
@click.option("--grid-file", type=click.Path(exists=True, dir_okay=False))
@click.option("--jobs", type=click.IntRange(1, 256), help="Default: as stored.")
@click.option("--failure-policy", type=POLICIES, help="Default: as stored.")
@dask_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def sweep_resume(ctx: click.Context, sweep_ref: str, grid: tuple[str, ...],
                 grid_file: str | None, jobs: int | None, failure_policy: str | None,
                 dask: str | None, command: tuple[str, ...]) -> None:
    """Run the cells whose latest attempt did not succeed, each from its last checkpoint."""
    from runnerd.driver import with_latest
    from runnerd_client.sweep import sweep_cells as cells

    conn = connect(ctx)
    stored = _stored(conn, sweep_ref)
    given = {"command": list(command) or None, **cells_spec(grid, grid_file)}
    changed = differences(stored["spec"], given)
    if changed:
        fail("refused: this is not the stored sweep; nothing was run.\n" + "\n".join(changed),
             EXIT_USAGE)
    take_over(conn, stored["sweep_id"])
    planned = [with_latest(c) for c in cells(conn, stored["sweep_id"], unfinished=True)]
    conn.close()
    if dask:
        sys.exit(on_dask(dask, {**stored, "failure_policy": failure_policy or
                                stored["failure_policy"]},
                         [(c.index, c.params, c.claim_after) for c in planned], resume=True))
    sys.exit(drive(ctx, _turn(stored, jobs, failure_policy, resume=True), planned))


@sweep.command("replicate")
@click.argument("sweep_ref", metavar="SWEEP")
@click.option("--failed-only", is_flag=True, help="Only the cells that failed.")
@click.option("--jobs", type=click.IntRange(1, 256), help="Default: as stored.")
@click.pass_context
def sweep_replicate(ctx: click.Context, sweep_ref: str, failed_only: bool,
                    jobs: int | None) -> None:
    """Run cells again and check each ends as recorded: succeeded again, or failed with the
    same failure class and signature. Exit 1 on any difference."""
    from runnerd.driver import with_latest
    from runnerd_client.sweep import sweep_cells as cells

    conn = connect(ctx)
    stored = _stored(conn, sweep_ref)
    wanted = ("failed",) if failed_only else ("succeeded", "failed")
    planned = [with_latest(c, expected=True) for c in cells(conn, stored["sweep_id"])
               if c["state"] in wanted]
    if not planned:
        fail("no cell has a recorded outcome to replicate", EXIT_ERROR)
    take_over(conn, stored["sweep_id"])
    turn = _turn(stored, jobs, SweepPolicy.CONTINUE_ON_FAILURE)
    conn.close()
    code = drive(ctx, turn, planned, summary=False)
    rows, differ = replication_table(turn.results)
    say(table(("CELL", "VARIATION", "RECORDED", "NOW", "SAME", "RUN"), rows))
    say(f"{len(rows) - differ} of {len(rows)} cell(s) ended as recorded")
    sys.exit(1 if differ else code if turn.interrupted else 0)


def on_dask(address: str, stored: dict[str, Any],
            planned: list[tuple[int, dict[str, Any], str | None]], resume: bool) -> int:
    """Run the cells' commands as tasks of the Dask cluster at `address`, each recorded by
    the worker plugin in its node's daemon; the exit status."""
    try:
        from distributed import Client as DaskClient

        from runnerd_client.dask import CommandCell, CommandFailed, RunnerdWorkerPlugin
        from runnerd_client.sweep import SweepOptions
        from runnerd_client.sweep import drive as drive_cells
    except ImportError:
        fail("--dask needs the dask extra: pip install 'runnerd[dask]'", EXIT_USAGE)
    spec = stored["spec"]
    options = SweepOptions(stored["experiment"], stored["sweep_id"], stored["failure_policy"],
                           spec.get("jobs") or 1, spec.get("retries", 0),
                           spec.get("backoff", 2.0), spec.get("retry_on", "retryable"),
                           resume=resume,
                           executor=DaskClient(address))  # type: ignore[no-untyped-call]
    options.executor.register_plugin(RunnerdWorkerPlugin(experiment=stored["experiment"]))
    say(f"sweep {stored['sweep_id']}: {len(planned)} cell(s) of"
        f" {shown(stored['experiment'])} on the Dask cluster at {address}")
    cell = CommandCell(tuple(spec["command"]), spec["cwd"], spec.get("timeout"))
    try:
        result = drive_cells(options, planned, cell)
    except CommandFailed as exc:
        say(f"fail_fast: {exc.failure_class}: {exc}", err=True)
        if exc.traceback:
            say(exc.traceback.rstrip(), err=True)
        return 1
    finally:
        options.executor.close()
    for outcome in result.outcomes:
        say(f"cell {outcome.index} {shown(outcome.variation)}: {outcome.state}"
            f" run {outcome.run_id or '-'}" + (f" ({outcome.error})"
                                               if outcome.error else ""))
    counts = result.summary
    say(f"sweep {result.sweep_id} {result.status}: {counts_text(counts)};"
        f" manifest {result.manifest}")
    return 0 if all(o.state in ("succeeded", "taken") for o in result.outcomes) else 1


def _ending(state: str, failure: dict[str, Any] | None) -> tuple[str, str | None, str | None]:
    failure = failure or {}
    return state, failure.get("failure_class"), failure.get("signature")


def replication_table(results: list[Result]) -> tuple[list[tuple[Any, ...]], int]:
    """Per cell: the recorded ending, the new one, and whether they are the same."""
    rows, differ = [], 0
    for result in sorted(results, key=lambda r: r.cell.index):
        expected = result.cell.expected or {}
        before = _ending(expected.get("state", "?"), expected.get("failure"))
        now = _ending(result.state, (result.run or {}).get("failure"))
        same = before == now
        differ += not same
        rows.append((result.cell.index, expected.get("variation", "?"),
                     _describe(before), _describe(now), "yes" if same else "NO",
                     (result.run or {}).get("run_id", "-")))
    return rows, differ


def _describe(ending: tuple[str, str | None, str | None]) -> str:
    state, failure_class, signature = ending
    return state if failure_class is None else f"{state} {failure_class} [{signature}]"


def stopping_on_signals(driver: Driver) -> AbstractContextManager[None]:
    """Ctrl-C or SIGTERM stops every running cell (TERM, grace, KILL) and starts no more."""
    from runnerd.launch import KILL_AFTER, Stop, on_signals

    def stop(signum: int) -> None:
        driver.turn.interrupted = driver.turn.interrupted or Stop.received(signum)
        driver.stop(driver.turn.interrupted, KILL_AFTER)

    return on_signals(stop)


def drive(ctx: click.Context, turn: Turn, planned: list[Planned], summary: bool = True) -> int:
    """Run the planned cells, end the turn, print the summary; the exit status.

    If the daemon went away meanwhile, the cells ran all the same (their events spooled):
    wait for it to be back and to have every event before ending the turn.
    """
    from runnerd.driver import Driver, end_turn, progress_line, refresh
    from runnerd_client.run import Client

    tty = sys.stderr.isatty()
    out = threading.Lock()

    def tell(text: str) -> None:
        with out:
            if tty:
                click.echo("\r\033[K", nl=False)
            say(text)

    def progress(driver: Driver) -> None:
        if tty:
            with out:
                click.echo(f"\r{progress_line(driver)}\033[K", nl=False, err=True)

    sweep_id = turn.sweep["sweep_id"]
    tell(f"sweep {sweep_id}: {len(planned)} cell(s) of {shown(turn.sweep['experiment'])},"
         f" {turn.jobs} at once, {turn.policy}")
    client = Client(ctx.obj["socket"])
    driver = Driver(client, turn, tell)
    with stopping_on_signals(driver):
        driver.run(planned, progress)
    if tty:
        click.echo("\r\033[K", nl=False, err=True)
    try:
        if not client.drain(END_PATIENCE):
            raise DaemonUnavailable(f"runnerd was unreachable for {END_PATIENCE:g} s")
        refresh(client, turn.results)
        conn = Connection(ctx.obj["socket"])
        ended = end_turn(conn, turn)
    except (RunnerdError, DaemonUnavailable) as exc:
        fail(f"the sweep's end was not recorded: {exc}\n(its cells' events are spooled;"
             " `runnerctl sweep resume` once runnerd is back)", EXIT_ERROR)
    if summary:
        print_summary(turn)
    stored = conn.call(SweepGet(sweep=sweep_id))["sweep"]
    counts = stored["cells_summary"]
    say(f"sweep {sweep_id} {stored['status']}: {counts_text(counts)};"
        f" manifest {ended.get('manifest') or stored['manifest']}")
    if turn.first_failure is not None:
        print_first_failure(turn.first_failure)
    if turn.interrupted is not None:
        return 128 + turn.interrupted.signum
    return 0 if all(r.state in ("succeeded", "taken") for r in turn.results) else 1


def print_summary(turn: Turn) -> None:
    from runnerd.driver import failure_text

    results = sorted(turn.results, key=lambda r: r.cell.index)
    listed = results if len(results) <= 50 else [r for r in results if r.state != "succeeded"]
    if listed:
        say(table(("CELL", "VARIATION", "STATE", "ATT", "RUN", "FAILURE"), [
            (r.cell.index, (r.run or {}).get("variation", "-"), r.state,
             (r.run or {}).get("attempt", "-"), (r.run or {}).get("run_id", "-"),
             "" if r.state == "succeeded" else failure_text(r)) for r in listed]))
    if len(listed) < len(results):
        say(f"({len(results) - len(listed)} more cell(s) succeeded)")


def print_first_failure(result: Result) -> None:
    from runnerd.driver import failure_text, stderr_text

    say(f"\nfail_fast: stopped at cell {result.cell.index}"
        f" ({json.dumps(result.cell.params)}): {failure_text(result)}", err=True)
    text = stderr_text(result).rstrip()
    if text:
        say(text, err=True)


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
    say(table(("SWEEP", "EXPERIMENT", "STATUS", "POLICY", "CELLS", "OK", "FAILED",
               "ABANDONED", "SKIPPED", "RUNNING", "CREATED"), [
        (s["sweep_id"], s["experiment"], s["status"], s["failure_policy"],
         s["cells_summary"]["total"], s["cells_summary"]["succeeded"],
         s["cells_summary"]["failed"], s["cells_summary"]["abandoned"],
         s["cells_summary"]["skipped"], s["cells_summary"]["running"],
         local_time(s["created_at"])) for s in sweeps]))


@sweep.command("show")
@click.argument("sweep_ref", metavar="SWEEP")
@json_option
@click.pass_context
def sweep_show(ctx: click.Context, sweep_ref: str, as_json: bool) -> None:
    """One sweep and its cells (--json: the shape of its manifest.json)."""
    from runnerd_client.sweep import sweep_cells as cells

    conn = connect(ctx)
    stored = _stored(conn, sweep_ref)
    all_cells = list(cells(conn, stored["sweep_id"]))
    if as_json:
        emit_json({**{k: stored[k] for k in MANIFEST_KEYS}, "cells": all_cells,
                   "cells_summary": stored["cells_summary"]})
        return
    counts = stored["cells_summary"]
    spec = stored["spec"]
    what = " ".join(spec["command"]) if "command" in spec else spec.get("function", "?")
    say(f"sweep {stored['sweep_id']} of {shown(stored['experiment'])}: {stored['status']},"
        f" {stored['failure_policy']}\nruns     {what}"
        f"\nmanifest {stored['manifest']}\ncells    {counts_text(counts)}")
    say(table(("CELL", "VARIATION", "STATE", "ATTEMPTS", "RUN", "FAILURE"), [
        (c["index"], c["variation"], c["state"], c["attempts"], c["run_id"] or "-",
         f"{c['failure']['failure_class']}: {c['failure']['message']}" if c["failure"]
         else "") for c in all_cells]))


@cli.command("resume")
@click.option("--interrupted", is_flag=True, required=True,
              help="Relaunch the runs (and sweeps) a crash of runnerd or the machine cut short.")
@click.option("--dry-run", is_flag=True, help="Only say what would be relaunched.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
@click.pass_context
def resume(ctx: click.Context, interrupted: bool, dry_run: bool, as_json: bool) -> None:
    """Relaunch interrupted launched runs from their last checkpoints, and resume the sweeps
    they belong to."""
    if as_json and not dry_run:
        raise click.UsageError("--json goes with --dry-run")
    runs = request(ctx, ListRuns(interrupted=True, limit=10_000))["runs"]
    sweeps = sorted({r["sweep_id"] for r in runs if r["sweep_id"]})
    launched = [r for r in runs if not r["sweep_id"] and r["launch"]]
    others = [r for r in runs if not r["sweep_id"] and not r["launch"]]
    if as_json:
        emit_json({"runs": [r["run_id"] for r in launched], "sweeps": sweeps,
                   "not_launched": [r["run_id"] for r in others]})
        return
    for r in others:
        say(f"{r['run_id']} {shown(r['experiment'])}/{shown(r['variation'])}: interrupted, but not"
            " launched by runnerctl; rerun it yourself (with resume=True)")
    for r in launched:
        say(f"{r['run_id']} {shown(r['experiment'])}/{shown(r['variation'])}: relaunch"
            f" {' '.join(r['launch']['command'])}")
    for sweep_id in sweeps:
        say(f"sweep {sweep_id}: resume its unfinished cells")
    if dry_run:
        return
    codes = relaunch(ctx, launched)
    for sweep_id in sweeps:
        codes.append(resume_sweep(ctx, sweep_id))
    sys.exit(max(codes, default=0) and 1)


def relaunch(ctx: click.Context, runs: list[dict[str, Any]]) -> list[int]:
    """Relaunch each run as the next attempt, resumed from its checkpoint, all at once."""
    from dataclasses import replace

    from runnerd.launch import Attempt, Launch, Launcher, Retries, forwarding, run_with_retries
    from runnerd_client.run import Client

    client, launcher = Client(ctx.obj["socket"]), Launcher()
    codes: list[int] = []

    def one(run: dict[str, Any]) -> None:
        launch = replace(Launch.from_run(run), resume=True)
        try:
            outcome = run_with_retries(client, launch, Retries(),
                                       Attempt(launcher, echo=False, retry_of=run["run_id"]))
        except RunnerdError as exc:
            say(f"{run['run_id']}: not relaunched: {exc}")
            codes.append(1)
            return
        state = "succeeded" if outcome.succeeded else "failed"
        say(f"{run['run_id']} -> {outcome.run.run_id}: {state}")
        codes.append(outcome.exit_code)

    threads = [threading.Thread(target=one, args=(run,)) for run in runs]
    with forwarding(launcher):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return codes


def resume_sweep(ctx: click.Context, sweep_id: str) -> int:
    from runnerd.driver import with_latest
    from runnerd_client.sweep import sweep_cells as cells

    conn = connect(ctx)
    stored = _stored(conn, sweep_id)
    take_over(conn, sweep_id)
    planned = [with_latest(c) for c in cells(conn, sweep_id, unfinished=True)]
    conn.close()
    return drive(ctx, _turn(stored, None, None, resume=True), planned)
