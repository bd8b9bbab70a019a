"""Runs: list and show, of one daemon, several, or a shared folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from runnerd.cli.common import (
    ago,
    choice,
    cli,
    emit_json,
    json_option,
    local_time,
    parse_duration,
    request,
    say,
    shown,
    table,
)
from runnerd.cli.nodes import (
    from_option,
    list_many,
    several,
    show_from,
    show_many,
)
from runnerd.cli.run_table import (
    cpu_time,
    human_bytes,
    moved,
    peak_memory,
    runs_table,
    runtime,
    typed,
    typed_runs,
)
from runnerd_client.protocol import (
    Get,
    ListRuns,
    State,
)
from runnerd_client.replies import FailureInfo, RunDetails, RunInfo

# The history of a run read from an export file, which holds none (`show --from`).
NO_HISTORY: dict[str, list[Any]] = {
    "transitions": [],
    "artifacts": [],
    "crash_files": [],
    "checkpoints": [],
}


@cli.command("list")
@click.option(
    "--state",
    "states",
    type=choice(State),
    multiple=True,
    help="Only this state (repeat it for several).",
)
@click.option("--experiment", help="Only this experiment.")
@click.option("--since", type=parse_duration, help="Created within this long, e.g. 12h.")
@click.option("--sweep", help="Only attempts of this sweep's cells.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@from_option
@json_option
@click.pass_context
def list_runs(
    ctx: click.Context,
    states: tuple[str, ...],
    experiment: str | None,
    since: float | None,
    sweep: str | None,
    limit: int,
    from_dir: Path | None,
    as_json: bool,
) -> None:
    """Runs, newest first; of several daemons (or export files) merged, each with its host."""
    after = time.time() - since if since is not None else None
    many = from_dir is not None or several(ctx)
    runs = newest_first(
        [
            list_many(ctx, req, from_dir) if many else request(ctx, req)["runs"]
            for req in (
                ListRuns(state=state, experiment=experiment, limit=limit, sweep=sweep, since=after)
                for state in dict.fromkeys(states or (None,))
            )
        ],
        limit,
    )
    if as_json:
        emit_json(runs)
    elif runs:
        say(runs_table(typed_runs(runs, "list.runs"), hosts=many))
    else:
        say("no runs")


def newest_first(listings: list[list[dict[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """Runs listed state by state (each newest first) as one listing, as the daemon orders
    runs, each once (a run may have changed state between two listings)."""
    if len(listings) == 1:
        return listings[0]
    runs = {r["run_id"]: r for listing in listings for r in listing}
    return sorted(runs.values(), key=lambda r: (r["created_at"], r["run_id"]), reverse=True)[:limit]


def _resources(run: RunInfo) -> str:
    if not run.resources:
        return "-"
    limit = human_bytes(run.resources["limit_bytes"])
    return f"peak {peak_memory(run)} of {limit}, CPU {cpu_time(run)}"


def _fields(r: RunDetails) -> list[tuple[str, object]]:
    return [
        ("run", r.run_id),
        ("experiment", f"{r.experiment} / {r.variation} (attempt {r.attempt})"),
        ("state", r.state),
        ("params", json.dumps(r.params)),
        ("sweep", f"{r.sweep_id} cell {r.cell}" if r.sweep_id else "-"),
        ("resumed", f"from {r.resumed_from}" if r.resumed_from else "-"),
        ("run_dir", r.run_dir),
        ("host / pids", f"{r.host or '-'} / {r.pids or '-'}"),
        ("created", local_time(r.created_at)),
        ("started", local_time(r.started_at)),
        ("ended", local_time(r.ended_at)),
        ("runtime", runtime(r)),
        ("heartbeats", f"{r.heartbeats} (last {ago(r.last_heartbeat_at)})"),
        ("resources", _resources(r)),
        ("progress", moved(r)),
    ]


def _show_human(run: RunDetails) -> None:
    for name, value in _fields(run):
        say(f"{name:<12} {shown(value)}")
    say("\nTransitions")
    say(
        table(
            ("WHEN", "FROM", "TO", "CAUSE", "SOURCE"),
            [(local_time(t.at), t.from_ or "-", t.to, t.cause, t.source) for t in run.transitions],
        )
    )
    if run.artifacts:
        say("\nArtifacts")
        say(
            table(
                ("PATH", "SIZE", "SHA256"),
                [(a.path, a.size, a.sha256[:16]) for a in run.artifacts],
            )
        )
    if run.checkpoints:
        say("\nCheckpoints")
        say(
            table(
                ("SEQ", "WHEN", "DATA", "PATH"),
                [
                    (c.seq, local_time(c.at), json.dumps(c.data), c.path or "-")
                    for c in run.checkpoints
                ],
            )
        )
    for warning in (run.resources or {}).get("warnings", []):
        say(f"\nwarning ({local_time(warning['at'])}): {shown(warning['message'])}")
    if run.crash_files:
        say("\nCrash files")
        say(table(("PATH", "KIND", "SIZE"), [(f.path, f.kind, f.size) for f in run.crash_files]))
    if run.failure is not None:
        _show_failure(run.failure)


def _show_failure(failure: FailureInfo) -> None:
    say(
        f"\nFailure: {shown(failure.failure_class)} ({failure.reason}), "
        f"signature {failure.signature}"
    )
    if failure.message:
        say(shown(failure.message))
    if failure.traceback:
        say("\n" + failure.traceback.rstrip())


def _show_env(run_id: str, env: dict[str, str] | None, with_values: bool) -> None:
    """The environment a launched run ran with: its values only when asked (--env)."""
    if env is None:
        return
    if not with_values:
        say(
            f"\nEnvironment: {len(env)} variables recorded ({', '.join(sorted(env)[:8])}"
            f"{', ...' if len(env) > 8 else ''}); `runnerctl show {run_id} --env` prints them"
        )
        return
    say("\nEnvironment")
    for name in sorted(env):
        say(f"{shown(name)}={shown(env[name])}")


@cli.command()
@click.argument("run")
@click.option(
    "--env",
    "with_env",
    is_flag=True,
    help="Also print the environment it was launched with, values included.",
)
@from_option
@json_option
@click.pass_context
def show(
    ctx: click.Context, run: str, with_env: bool, from_dir: Path | None, as_json: bool
) -> None:
    """One run: fields, transitions, artifacts, checkpoints and failure."""
    one = from_dir is None and not several(ctx)
    if with_env and not one:
        raise click.UsageError("--env asks one daemon")
    env: dict[str, str] | None = None
    if one:
        reply = request(ctx, Get(run=run, env=True))
        obj, env = reply["run"], reply.get("env")
    else:
        obj = show_from(ctx, from_dir, run) if from_dir is not None else show_many(ctx, run)
    if as_json:
        emit_json({**obj, "env": env} if with_env else obj)
        return
    details = typed(RunDetails, obj if from_dir is None else {**NO_HISTORY, **obj}, "get.run")
    if "daemon" in obj:
        say(f"{'daemon':<12} {shown(obj['daemon'])}")
    if label := obj.get("label"):
        say(
            f"{'label':<12} {shown(label['category'])}, held by the Dask scheduler until a "
            f"worker of {shown(label['node'])} is back: {shown(label['note'])}"
        )
    _show_human(details)
    _show_env(details.run_id, env, with_env)
