"""Runs and their live view: status (--watch), list, show, follow."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from runnerd.cli.common import (
    EXIT_ERROR,
    EXIT_UNREACHABLE,
    ago,
    choice,
    cli,
    cpu_time,
    emit_json,
    fail,
    failure_summary,
    human_bytes,
    json_option,
    local_time,
    moved,
    parse_duration,
    peak_memory,
    request,
    runs_table,
    runtime,
    say,
    shown,
    span,
    subscribed,
    table,
)
from runnerd.cli.merge import total_counts
from runnerd.cli.nodes import (
    ask_each,
    from_option,
    list_many,
    mirror_line,
    several,
    show_from,
    show_many,
    status_from,
)
from runnerd_client.connection import DaemonUnavailable
from runnerd_client.protocol import (
    Get,
    ListRuns,
    State,
    Status,
    SweepGet,
)


@cli.command()
@json_option
@click.option("--watch", is_flag=True, help="Redraw as runs change (driven by events).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="With --watch: redraw at most this often.",
)
@from_option
@click.pass_context
def status(
    ctx: click.Context, as_json: bool, watch: bool, interval: float, from_dir: Path | None
) -> None:
    """Daemon health, counts by state, active runs and latest failures."""
    if from_dir is not None and not watch:
        status_from(from_dir, as_json)
        return
    if several(ctx) or from_dir is not None:
        if watch:
            raise click.UsageError("--watch follows one daemon: give one --socket")
        status_many(ctx, as_json)
        return
    if watch:
        watch_status(ctx, interval)
        return
    body = request(ctx, Status())
    body.pop("id", None)
    body.pop("ok", None)
    if as_json:
        emit_json(body)
    else:
        say(render_status(body))


def render_status(body: dict[str, Any]) -> str:
    d = body["daemon"]
    lines = [
        f"runnerd {d['version']} (pid {d['pid']}), up {span(d['uptime_sec'])}, "
        f"{d['clients']} client(s)",
        f"socket {d['socket']}\nregistry {d['db']} ({d['db_bytes'] / 1e6:.1f} MB)",
    ]
    if body.get("mirror"):
        lines.append(mirror_line(body["mirror"]))
    lines.append(f"\n{counts_line(body['counts'])}")
    if body["active"]:
        lines += ["\nActive runs", runs_table(body["active"], progress=True)]
    if body["failures"]:
        lines += [
            "\nLatest failures",
            table(
                ("RUN", "WHEN", "REASON", "FAILURE"),
                [
                    (f["run_id"], ago(f["at"]), f["reason"], failure_summary({"failure": f}))
                    for f in body["failures"]
                ],
            ),
        ]
    return "\n".join(lines)


def counts_line(counts: dict[str, int]) -> str:
    summary = ", ".join(f"{counts[s]} {s}" for s in State if counts.get(s))
    return f"{sum(counts.values())} run(s){': ' + summary if summary else ''}"


def status_many(ctx: click.Context, as_json: bool) -> None:
    """One section per daemon, an unreachable one said so, then the counts of all of them;
    exit 3 only when none answered."""
    answers = ask_each(ctx, Status())
    answered = [a.body for a in answers if a.body is not None]
    counts = total_counts(body["counts"] for body in answered)
    if as_json:
        emit_json(
            {
                "counts": counts,
                "daemons": [
                    {
                        "daemon": a.daemon,
                        "reachable": not a.unreachable,
                        "status": a.body,
                        "error": a.error.message if a.error else None,
                    }
                    for a in answers
                ],
            }
        )
    else:
        for a in answers:
            text = (
                render_status(a.body)
                if a.body is not None
                else f"unreachable: {a.error.message if a.error else ''}"
            )
            say(f"== {shown(a.daemon)} ==\n{text}\n")
        say(f"All daemons ({len(answered)} of {len(answers)} answered): {counts_line(counts)}")
    if not answered:
        sys.exit(EXIT_UNREACHABLE if all(a.unreachable for a in answers) else EXIT_ERROR)


def watch_status(ctx: click.Context, interval: float) -> None:
    """Redraw when something changes (at most every `interval` s; at least every 30 s)."""
    events = subscribed(ctx)
    try:
        while True:
            drawn = time.monotonic()
            click.echo("\033[H\033[2J", nl=False)
            say(render_status(request(ctx, Status())))
            events.next_event(timeout=30.0)
            time.sleep(max(0.0, interval - (time.monotonic() - drawn)))
            while events.next_event(timeout=0) is not None:
                pass
    except DaemonUnavailable:
        fail("the daemon went away", EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        pass


def describe(event: dict[str, Any]) -> str:
    kind = event["event"]
    if kind == "transition":
        return f"{event['from'] or '-'} -> {event['to']} ({event['cause']}, {event['source']})"
    if kind == "artifact":
        return f"artifact {event['path']} ({event['size']} bytes)"
    if kind == "checkpoint":
        return f"checkpoint {json.dumps(event['data'])}" + (
            f" {event['path']}" if event["path"] else ""
        )
    if kind == "failure":
        return f"failure {event['failure_class']}: {event['message']} [{event['category']}]"
    if kind == "sweep_ended":
        return f"sweep ended {event['status']}"
    return str(kind)


def run_exit_status(ctx: click.Context, run_id: str) -> int:
    """A followed run's outcome as an exit status: 0, the command's own code, or 1."""
    run = request(ctx, Get(run=run_id))["run"]
    if run["state"] == State.SUCCEEDED:
        return 0
    code = (run["failure"] or {}).get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1


@cli.command()
@click.argument("run", required=False)
@click.option("--experiment", help="Follow every run of this experiment.")
@click.option("--sweep", help="Follow every run of this sweep, from its start.")
@click.option(
    "--since",
    "since_seq",
    type=click.IntRange(min=0),
    metavar="SEQ",
    help="Replay the events from this seq on, then stream (resume a consumer: "
    "the last seq it handled + 1).",
)
@from_option
@json_option
@click.pass_context
def follow(
    ctx: click.Context,
    run: str | None,
    experiment: str | None,
    sweep: str | None,
    since_seq: int | None,
    from_dir: Path | None,
    as_json: bool,
) -> None:
    """Print events as they happen. With RUN: from its start, until it ends, and exit with
    its outcome (0 succeeded, else the command's exit code or 1). --json: one event per
    line, each with its seq; of several daemons (or a folder), each naming its daemon."""
    if from_dir is not None or several(ctx):
        from runnerd.cli.following import follow_many

        follow_many(ctx, run, experiment, sweep, since_seq, as_json, from_dir)
        return
    run_id = request(ctx, Get(run=run))["run"]["run_id"] if run else None
    sweep_id = request(ctx, SweepGet(sweep=sweep))["sweep"]["sweep_id"] if sweep else None
    last = 0 if run_id or sweep_id else None
    if since_seq is not None:
        last = max(since_seq - 1, 0)
    while True:
        events = subscribed(ctx, run=run_id, experiment=experiment, sweep=sweep_id, since=last)
        try:
            while (event := events.next_event()) is not None:
                if event["event"] == "lagged":
                    say(
                        f"runnerctl: lagged, {event['dropped']} events dropped; catching up",
                        err=True,
                    )
                    last = event["seq"]
                    break
                last = event["seq"]
                if as_json:
                    click.echo(json.dumps(event, sort_keys=True))
                else:
                    say(
                        f"{local_time(event['at'])} {event['run_id'] or event['sweep_id']} "
                        f"{shown(event['experiment'])}: {shown(describe(event))}"
                    )
                if run_id and event["event"] == "transition" and State(event["to"]).terminal:
                    sys.exit(run_exit_status(ctx, run_id))
        except DaemonUnavailable:
            fail("the daemon went away", EXIT_UNREACHABLE)
        finally:
            events.close()


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
        say(runs_table(runs, hosts=many))
    else:
        say("no runs")


def newest_first(listings: list[list[dict[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """Runs listed state by state (each newest first) as one listing, as the daemon orders
    runs, each once (a run may have changed state between two listings)."""
    if len(listings) == 1:
        return listings[0]
    runs = {r["run_id"]: r for listing in listings for r in listing}
    return sorted(runs.values(), key=lambda r: (r["created_at"], r["run_id"]), reverse=True)[:limit]


def _resources(run: dict[str, Any]) -> str:
    use = run.get("resources")
    if not use:
        return "-"
    return f"peak {peak_memory(run)} of {human_bytes(use['limit_bytes'])}, CPU {cpu_time(run)}"


def _show_human(run: dict[str, Any]) -> None:
    fields: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("run", lambda r: r["run_id"]),
        ("experiment", lambda r: f"{r['experiment']} / {r['variation']} (attempt {r['attempt']})"),
        ("state", lambda r: r["state"]),
        ("params", lambda r: json.dumps(r["params"])),
        ("sweep", lambda r: f"{r['sweep_id']} cell {r['cell']}" if r["sweep_id"] else "-"),
        ("resumed", lambda r: f"from {r['resumed_from']}" if r["resumed_from"] else "-"),
        ("run_dir", lambda r: r["run_dir"]),
        ("host / pids", lambda r: f"{r['host'] or '-'} / {r['pids'] or '-'}"),
        ("created", lambda r: local_time(r["created_at"])),
        ("started", lambda r: local_time(r["started_at"])),
        ("ended", lambda r: local_time(r["ended_at"])),
        ("runtime", runtime),
        ("heartbeats", lambda r: f"{r['heartbeats']} (last {ago(r['last_heartbeat_at'])})"),
        ("resources", _resources),
        ("progress", moved),
    ]
    for name, get in fields:
        say(f"{name:<12} {shown(get(run))}")
    say("\nTransitions")
    say(
        table(
            ("WHEN", "FROM", "TO", "CAUSE", "SOURCE"),
            [
                (local_time(t["at"]), t["from"] or "-", t["to"], t["cause"], t["source"])
                for t in run["transitions"]
            ],
        )
    )
    if run["artifacts"]:
        say("\nArtifacts")
        say(
            table(
                ("PATH", "SIZE", "SHA256"),
                [(a["path"], a["size"], a["sha256"][:16]) for a in run["artifacts"]],
            )
        )
    if run["checkpoints"]:
        say("\nCheckpoints")
        say(
            table(
                ("SEQ", "WHEN", "DATA", "PATH"),
                [
                    (c["seq"], local_time(c["at"]), json.dumps(c["data"]), c["path"] or "-")
                    for c in run["checkpoints"]
                ],
            )
        )
    for warning in (run.get("resources") or {}).get("warnings", []):
        say(f"\nwarning ({local_time(warning['at'])}): {shown(warning['message'])}")
    if run.get("crash_files"):
        say("\nCrash files")
        say(
            table(
                ("PATH", "KIND", "SIZE"),
                [(f["path"], f["kind"], f["size"]) for f in run["crash_files"]],
            )
        )
    failure = run.get("failure")
    if failure:
        say(
            f"\nFailure: {shown(failure['failure_class'])} ({failure['reason']}), "
            f"signature {failure['signature']}"
        )
        if failure["message"]:
            say(shown(failure["message"]))
        if failure.get("traceback"):
            say("\n" + failure["traceback"].rstrip())


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
        obj = show_from(from_dir, run) if from_dir is not None else show_many(ctx, run)
    if as_json:
        emit_json({**obj, "env": env} if with_env else obj)
        return
    if "daemon" in obj:
        say(f"{'daemon':<12} {shown(obj['daemon'])}")
    _show_human(obj)
    _show_env(obj["run_id"], env, with_env)
