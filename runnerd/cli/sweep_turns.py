"""A sweep's turn from the command line: the sweep recorded or taken over, progress drawn
on a terminal, a line per cell, the summary table and the exit status; the turn itself is
`runnerd.cli.sweep_driver`'s."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from runnerd.cli.common import (
    EXIT_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    fail,
    refused,
    say,
    shown,
    table,
)
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import RunnerdError, SweepCreate, SweepGet, SweepStart
from runnerd_client.sweep_engine import Listener
from runnerd_client.sweep_model import CellOutcome, PlannedCell, SweepOptions, SweepResult

if TYPE_CHECKING:
    from runnerd.cli.sweep_driver import Turn

T = TypeVar("T")


def connect(ctx: click.Context) -> Connection:
    try:
        return Connection(ctx.obj["socket"])
    except DaemonUnavailable as exc:
        fail(f"{exc.message}\n(is the daemon running? start it with `runnerd`)", EXIT_UNREACHABLE)


def counts_text(summary: dict[str, int]) -> str:
    """A cells summary as `3 succeeded, 1 failed of 4`."""
    return (
        ", ".join(f"{n} {state}" for state, n in summary.items() if n and state != "total")
        + f" of {summary['total']}"
    )


def stored_sweep(conn: Connection, ref: str) -> dict[str, Any]:
    try:
        sweep_obj: dict[str, Any] = conn.call(SweepGet(sweep=ref))["sweep"]
    except RunnerdError as exc:
        refused(exc)
    return sweep_obj


def take_over(conn: Connection, sweep_id: str) -> None:
    try:
        conn.call(SweepStart(key=new_key(), sweep_id=sweep_id))
    except RunnerdError as exc:
        refused(exc, f"{exc.code}: ")


def start_sweep(
    ctx: click.Context,
    experiment: str,
    spec: dict[str, Any],
    cells: list[dict[str, Any]],
    policy: str,
    folder: str | None,
    dask: str | None,
) -> int:
    """Record a new sweep of `cells` and run them as its first turn; the exit status."""
    sweep_id = new_run_id()
    conn = connect(ctx)
    try:
        conn.call(
            SweepCreate(
                key=new_key(),
                sweep_id=sweep_id,
                experiment=experiment,
                spec=spec,
                failure_policy=policy,
                folder=folder,
            )
        )
        stored = conn.call(SweepGet(sweep=sweep_id))["sweep"]
    except RunnerdError as exc:
        refused(exc, f"{exc.code}: ")
    conn.close()
    planned = [PlannedCell(i, c) for i, c in enumerate(cells)]
    return run_cells(ctx, stored, SweepOptions.of(stored), planned, dask)


def resume_sweep(
    ctx: click.Context,
    stored: dict[str, Any],
    jobs: int | None,
    policy: str | None,
    dask: str | None = None,
) -> int:
    """Take the sweep over and run its unfinished cells; the exit status."""
    from runnerd_client.sweep import unfinished

    conn = connect(ctx)
    take_over(conn, stored["sweep_id"])
    planned = unfinished(conn, stored["sweep_id"])
    conn.close()
    options = SweepOptions.of(stored, jobs=jobs, policy=policy, resume=True)
    return run_cells(ctx, stored, options, planned, dask)


def run_cells(
    ctx: click.Context,
    stored: dict[str, Any],
    options: SweepOptions,
    planned: list[PlannedCell],
    dask: str | None,
) -> int:
    return on_dask(dask, stored, options, planned) if dask else drive(ctx, stored, options, planned)


def on_dask(
    address: str, stored: dict[str, Any], options: SweepOptions, planned: list[PlannedCell]
) -> int:
    """Run the cells' commands on the Dask cluster at `address`; the exit status."""
    from runnerd.cli import sweep_driver as driver
    from runnerd_client.dask_commands import CommandFailed
    from runnerd_client.sweep_model import SweepFailed

    say(
        f"sweep {stored['sweep_id']}: {len(planned)} cell(s) of"
        f" {shown(stored['experiment'])} on the Dask cluster at {address}"
    )
    try:
        result = driver.on_dask(address, stored, options, planned)
    except ImportError:
        fail("--dask needs the dask extra: pip install 'runnerd[dask]'", EXIT_USAGE)
    except SweepFailed as exc:
        cause = exc.__cause__
        if isinstance(cause, CommandFailed):
            say(f"fail_fast: {cause.failure_class}: {cause}", err=True)
            if cause.traceback:
                say(cause.traceback.rstrip(), err=True)
        else:
            say(f"fail_fast: {exc}", err=True)
        return 1
    for outcome in result.outcomes:
        say(
            f"cell {outcome.index} {shown(outcome.variation)}: {outcome.state}"
            f" run {outcome.run_id or '-'}" + (f" ({outcome.error})" if outcome.error else "")
        )
    say(
        f"sweep {result.sweep_id} {result.status}: {counts_text(result.summary)};"
        f" manifest {result.manifest}"
    )
    return 0 if all(o.state in ("succeeded", "taken") for o in result.outcomes) else 1


def with_progress(intro: str, total: int, run: Callable[[Listener], T]) -> T:
    """Call `run` with a listener printing a line per finished cell and, on a terminal,
    redrawing a progress line; a daemon that stayed away is an error."""
    from runnerd.cli import sweep_driver as driver

    tty = sys.stderr.isatty()
    out = threading.Lock()

    def tell(text: str) -> None:
        with out:
            if tty:
                click.echo("\r\033[K", nl=False)
            say(text)

    def draw(text: str) -> None:
        if tty:
            with out:
                click.echo(f"\r{text}\033[K", nl=False, err=True)

    tell(intro)
    try:
        return run(driver.Progress(total, tell, draw))
    except driver.NotRecorded as exc:
        fail(
            f"the sweep's end was not recorded: {exc}\n(its cells' events are spooled;"
            " `runnerctl sweep resume` once runnerd is back)",
            EXIT_ERROR,
        )
    finally:
        if tty:
            click.echo("\r\033[K", nl=False, err=True)


def drive(
    ctx: click.Context, stored: dict[str, Any], options: SweepOptions, planned: list[PlannedCell]
) -> int:
    """Run the planned cells, end the turn, print the summary; the exit status."""
    from runnerd.cli import sweep_driver as driver

    turn, result = with_progress(
        f"sweep {stored['sweep_id']}: {len(planned)} cell(s) of"
        f" {shown(stored['experiment'])}, {options.jobs} at once, {options.policy}",
        len(planned),
        lambda listener: driver.drive(ctx.obj["socket"], stored, options, planned, listener),
    )
    print_summary(turn, result)
    return exit_status(turn)


def replicate(
    ctx: click.Context, stored: dict[str, Any], recorded: dict[int, Any], jobs: int | None
) -> int:
    """Replicate the recorded cells, print each verdict; exit 1 on any difference."""
    from runnerd.cli import replicate

    def run(listener: Listener) -> replicate.Replication:
        try:
            return replicate.replicate(ctx.obj["socket"], stored, recorded, jobs, listener)
        except OSError as exc:
            fail(f"the replication's report was not written: {exc}", EXIT_ERROR)

    done = with_progress(
        f"sweep {stored['sweep_id']}: {len(recorded)} cell(s) of"
        f" {shown(stored['experiment'])} replicated",
        len(recorded),
        run,
    )
    say(
        table(
            ("CELL", "VARIATION", "RECORDED", "NOW", "SAME", "RUN"),
            [
                (
                    v.index,
                    v.variation,
                    v.recorded.text(),
                    v.now.text(),
                    "yes" if v.same else "NO",
                    v.now.run_id or "-",
                )
                for v in done.verdicts
            ],
        )
    )
    say(
        f"{len(done.verdicts) - done.differ} of {len(done.verdicts)} cell(s) ended as"
        f" recorded; replication {done.replication_id}, report {done.report}"
    )
    return 1 if done.differ else 128 + signal.SIGINT if done.interrupted else 0


def exit_status(turn: Turn) -> int:
    if turn.interrupted is not None:
        return 128 + turn.interrupted.signum
    return 0 if all(o.state in ("succeeded", "taken") for o in turn.outcomes) else 1


def print_summary(turn: Turn, result: SweepResult) -> None:
    """The cells this turn ran (the failed ones only, past 50), the sweep's counts, and
    under fail_fast the failure it stopped at. ATTEMPTS is the manifest's: the cell's
    attempts in this sweep, retries and resumes included."""
    from runnerd.cli.sweep_driver import failure_text

    outcomes = result.outcomes
    listed = outcomes if len(outcomes) <= 50 else [o for o in outcomes if o.state != "succeeded"]
    if listed:
        say(
            table(
                ("CELL", "VARIATION", "STATE", "ATTEMPTS", "RUN", "FAILURE"),
                [
                    (
                        o.index,
                        o.variation,
                        o.state,
                        o.attempts,
                        o.run_id or "-",
                        "" if o.state == "succeeded" else failure_text(o),
                    )
                    for o in listed
                ],
            )
        )
    if len(listed) < len(outcomes):
        say(f"({len(outcomes) - len(listed)} more cell(s) succeeded)")
    say(
        f"sweep {result.sweep_id} {result.status}: {counts_text(result.summary)};"
        f" manifest {result.manifest}"
    )
    if turn.first_failure is not None:
        print_first_failure(turn.first_failure)


def print_first_failure(outcome: CellOutcome) -> None:
    from runnerd.cli.sweep_driver import failure_text, stderr_text

    say(
        f"\nfail_fast: stopped at cell {outcome.index}"
        f" ({json.dumps(outcome.params)}): {failure_text(outcome)}",
        err=True,
    )
    text = stderr_text(outcome).rstrip()
    if text:
        say(text, err=True)
