"""Launching commands as runs: exec, retry, cancel."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from runnerd.cli.common import (
    EXIT_ERROR,
    choice,
    cli,
    fail,
    parse_params,
    parse_size,
    parse_timeout,
    refused,
    request,
    retry_options,
    say,
)
from runnerd_client.ids import new_key
from runnerd_client.protocol import (
    Cancel,
    Get,
    RunnerdError,
)

if TYPE_CHECKING:
    from runnerd.cli.attempts import Launch
    from runnerd_client.retries import Retries


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--experiment", help="Experiment name (default: the command's name).")
@click.option("--variation", default="default", show_default=True)
@click.option("--param", "param_pairs", multiple=True, metavar="K=V", help="A run parameter.")
@click.option("--run-dir", type=click.Path(file_okay=False, resolve_path=True))
@click.option("--timeout", type=parse_timeout, help="TERM, then KILL, after this long.")
@click.option("--memory", type=parse_size, help="Run in a memory cgroup limited to this.")
@retry_options
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the last unsuccessful attempt from its last checkpoint ($RUNNERD_CHECKPOINT).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_command(
    ctx: click.Context,
    experiment: str | None,
    variation: str,
    param_pairs: tuple[str, ...],
    run_dir: str | None,
    timeout: float | None,
    memory: int | None,
    retries: int,
    backoff: float,
    retry_on: str,
    resume: bool,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND as a tracked run; exit with its exit code."""
    from runnerd.cli.attempts import Launch
    from runnerd_client.retries import Retries

    launch = Launch(
        command=list(command),
        params=parse_params(param_pairs),
        run_dir=run_dir,
        experiment=experiment if experiment is not None else Path(command[0]).name,
        variation=variation,
        timeout=timeout,
        memory=memory,
        resume=resume,
    )
    checked(launch)
    sys.exit(launch_in_foreground(ctx, launch, Retries(retries, backoff, retry_on)))


OPTIONS = {
    "experiment": "--experiment",
    "variation": "--variation",
    "params": "--param",
    "run_dir": "--run-dir",
    "timeout": "--timeout",
    "memory": "--memory",
}


def checked(launch: Launch) -> None:
    """Refuse, before anything is launched, a launch whose run the daemon would refuse: a
    usage error (exit 2) naming the option."""
    try:
        launch.check()
    except (TypeError, ValueError) as exc:
        field = str(exc).split(" ", 1)[0]
        raise click.BadParameter(str(exc), param_hint=f"'{OPTIONS.get(field, field)}'") from None


def launch_in_foreground(
    ctx: click.Context, launch: Launch, retries: Retries, retry_of: str | None = None
) -> int:
    """Run a launch with its retries, passing Ctrl-C and SIGTERM on; its exit code."""
    from runnerd.cli.attempts import run_in_foreground

    try:
        outcome = run_in_foreground(ctx.obj["socket"], launch, retries, retry_of)
    except RunnerdError as exc:
        refused(exc, f"{exc.code}: ")
    return outcome.exit_code


@cli.command()
@click.argument("run")
@click.pass_context
def retry(ctx: click.Context, run: str) -> None:
    """Run a run launched by exec again, as the next attempt, with the same command, in
    the environment it ran with."""
    from runnerd.cli.attempts import Launch
    from runnerd_client.retries import Retries

    reply = request(ctx, Get(run=run, env=True))
    previous = reply["run"]
    try:
        launch = Launch.from_run(previous, reply.get("env"))
    except RunnerdError as exc:
        fail(exc.message, EXIT_ERROR)
    sys.exit(launch_in_foreground(ctx, launch, Retries(), retry_of=previous["run_id"]))


@cli.command()
@click.argument("run")
@click.option(
    "--signal",
    "signame",
    type=choice(["TERM", "KILL", "INT", "HUP"]),
    help="Also send this signal to the run's processes.",
)
@click.pass_context
def cancel(ctx: click.Context, run: str, signame: str | None) -> None:
    """Mark RUN failed_abandoned, signalling its processes if asked."""
    run_id = request(ctx, Get(run=run))["run"]["run_id"]
    body = request(ctx, Cancel(key=new_key(), run_id=run_id, signal=signame))
    signalled = body.get("signalled") or []
    say(
        f"{run_id}: {body['state']}"
        + (
            f"; sent SIG{signame} to {', '.join(map(str, signalled)) or 'no live process'}"
            if signame
            else ""
        )
    )
