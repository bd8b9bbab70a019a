"""Launching commands as runs: exec, retry, cancel."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from runnerd.cli.common import (
    EXIT_ERROR,
    cli,
    fail,
    parse_duration,
    parse_size,
    request,
)
from runnerd_client.ids import new_key
from runnerd_client.protocol import (
    Cancel,
    Get,
    RunnerdError,
)


def _params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """k=v pairs; a value that parses as JSON (a number, true, a list) keeps its type."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not k=v", param_hint="--param")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--experiment", help="Experiment name (default: the command's name).")
@click.option("--variation", default="default", show_default=True)
@click.option("--param", "param_pairs", multiple=True, metavar="K=V", help="A run parameter.")
@click.option("--run-dir", type=click.Path(file_okay=False, resolve_path=True))
@click.option("--timeout", type=parse_duration, help="TERM, then KILL, after this long.")
@click.option("--memory", type=parse_size, help="Run in a memory cgroup limited to this.")
@click.option("--retries", type=click.IntRange(0, 100), default=0, show_default=True)
@click.option("--backoff", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Wait backoff**attempt seconds (with jitter) before a retry.")
@click.option("--retry-on", type=click.Choice(["retryable", "any"]), default="retryable",
              show_default=True, help="Retry only failures diagnosed retryable, or any.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_command(ctx: click.Context, experiment: str | None, variation: str,
                 param_pairs: tuple[str, ...], run_dir: str | None, timeout: float | None,
                 memory: int | None, retries: int, backoff: float, retry_on: str,
                 command: tuple[str, ...]) -> None:
    """Run COMMAND as a tracked run; exit with its exit code."""
    from runnerd.launch import Launch, run_with_retries
    from runnerd_client.run import Client

    launch = Launch(command=list(command), params=_params(param_pairs), run_dir=run_dir,
                    experiment=experiment or Path(command[0]).name, variation=variation,
                    timeout=timeout, memory=memory)
    sys.exit(run_with_retries(Client(ctx.obj["socket"]), launch, retries=retries,
                              backoff=backoff, retry_on=retry_on))


@cli.command()
@click.argument("run")
@click.pass_context
def retry(ctx: click.Context, run: str) -> None:
    """Run a run launched by exec again, as the next attempt, with the same command."""
    from runnerd.launch import Launch, run_once
    from runnerd_client.run import Client

    previous = request(ctx, Get(run=run))["run"]
    try:
        launch = Launch.from_run(previous)
    except RunnerdError as exc:
        fail(exc.message, EXIT_ERROR)
    sys.exit(run_once(Client(ctx.obj["socket"]), launch, retry_of=previous["run_id"]).exit_code)


@cli.command()
@click.argument("run")
@click.option("--signal", "signame", type=click.Choice(["TERM", "KILL", "INT", "HUP"]),
              help="Also send this signal to the run's processes.")
@click.pass_context
def cancel(ctx: click.Context, run: str, signame: str | None) -> None:
    """Mark RUN failed_abandoned, signalling its processes if asked."""
    run_id = request(ctx, Get(run=run))["run"]["run_id"]
    body = request(ctx, Cancel(key=new_key(), run_id=run_id, signal=signame))
    signalled = body.get("signalled") or []
    click.echo(f"{run_id}: {body['state']}" + (
        f"; sent SIG{signame} to {', '.join(map(str, signalled)) or 'no live process'}"
        if signame else ""))


