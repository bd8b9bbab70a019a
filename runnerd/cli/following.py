"""`runnerctl follow`: events as they happen, of one daemon or over several daemons
(`--socket` repeated), the nodes of a Dask cluster (`--dask`) or a shared folder
(`--from`): one stream, each line naming where it happened (its `daemon`).

Each daemon numbers its own events, so `--since SEQ` needs one daemon. A daemon that goes
away is named and the others are followed on; with RUN, the run is found on the daemon
that has it, followed from its first event, and its outcome is the exit status. A folder
has no live stream: its mirrored records are read again every few seconds and their new
transitions printed.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from runnerd.cli import dask_nodes
from runnerd.cli.common import (
    EXIT_NO_RUN,
    EXIT_UNREACHABLE,
    cli,
    fail,
    json_option,
    local_time,
    request,
    say,
    shown,
    subscribed,
)
from runnerd.cli.merge import Item
from runnerd.cli.nodes import ask_each, from_option, read_folder, several, show_from, show_many
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.protocol import Get, State, Subscribe, SweepGet

FOLDER_POLL = 2.0
Event = tuple[str, dict[str, Any] | None]  # (daemon, event); None: that daemon went away


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
        follow_many(ctx, run, experiment, sweep, since_seq, as_json, from_dir)
    else:
        follow_one(ctx, run, experiment, sweep, since_seq, as_json)


def follow_one(
    ctx: click.Context,
    run: str | None,
    experiment: str | None,
    sweep: str | None,
    since_seq: int | None,
    as_json: bool,
) -> None:
    """The one daemon's events; a lag re-subscribes from the last seq seen."""
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
                    sys.exit(exit_status(request(ctx, Get(run=run_id))["run"]))
        except DaemonUnavailable:
            fail("the daemon went away", EXIT_UNREACHABLE)
        finally:
            events.close()


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


def follow_many(
    ctx: click.Context,
    run: str | None,
    experiment: str | None,
    sweep: str | None,
    since_seq: int | None,
    as_json: bool,
    folder: Path | None,
) -> None:
    """Print every source's events as they happen, until Ctrl-C (or RUN's end)."""
    if since_seq is not None:
        raise click.UsageError("--since SEQ is one daemon's position: give one --socket")
    if folder is not None:
        events = _folder_events(folder, run, experiment)
    else:
        filters: dict[str, Any] = {
            "experiment": experiment,
            "sweep": _sweep_id(ctx, sweep) if sweep else None,
        }
        target = show_many(ctx, run) if run else None
        if target is not None:
            filters = {"run": target["run_id"], "since": 0}
        daemons = [target["daemon"]] if target is not None else None
        events = (
            _dask_events(ctx, filters, daemons)
            if ctx.obj.get("dask")
            else _socket_events([Path(d) for d in daemons or ctx.obj["sockets"]], filters)
        )
    try:
        for daemon, event in events:
            _print(daemon, event, as_json)
            if run and event["event"] == "transition" and State(event["to"]).terminal:
                sys.exit(_outcome(ctx, event["run_id"], folder))
    except KeyboardInterrupt:
        pass


def _sweep_id(ctx: click.Context, prefix: str) -> str:
    """The sweep's full id, from whichever daemon knows it (its cells may run anywhere)."""
    for answer in ask_each(ctx, SweepGet(sweep=prefix)):
        if answer.body is not None:
            return str(answer.body["sweep"]["sweep_id"])
    fail(f"no daemon knows a sweep matching {prefix!r}", EXIT_NO_RUN)


def _print(daemon: str, event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({**event, "daemon": daemon}, sort_keys=True))
        return
    say(
        f"{local_time(event['at'])} {shown(daemon)} {event['run_id'] or event['sweep_id']} "
        f"{shown(event['experiment'])}: {shown(describe(event))}"
    )


def _outcome(ctx: click.Context, run_id: str, folder: Path | None) -> int:
    run = show_from(ctx, folder, run_id) if folder is not None else show_many(ctx, run_id)
    return exit_status(run)


def exit_status(run: Item) -> int:
    """A followed run's outcome as an exit status: 0, the command's own code, or 1."""
    if run["state"] == State.SUCCEEDED:
        return 0
    code = (run["failure"] or {}).get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1


def _socket_events(sockets: list[Path], filters: dict[str, Any]) -> Iterator[tuple[str, Item]]:
    """Every daemon's events, each read by a thread of its own; exit 3 once all are gone."""
    found: queue.SimpleQueue[Event] = queue.SimpleQueue()
    for path in sockets:
        threading.Thread(target=_stream, args=(path, filters, found), daemon=True).start()
    live = len(sockets)
    while live:
        daemon, event = found.get()
        if event is None:
            live -= 1
            continue
        yield daemon, event
    fail("every daemon went away", EXIT_UNREACHABLE)


def _stream(path: Path, filters: dict[str, Any], found: queue.SimpleQueue[Event]) -> None:
    """One daemon's events; a lag re-subscribes from the last seq seen, as `follow` does."""
    last = filters.get("since")
    try:
        while True:
            conn = Connection(path)
            try:
                conn.call(Subscribe(**{**filters, "since": last}))
                while (event := conn.next_event()) is not None:
                    last = event["seq"]
                    if event["event"] == "lagged":
                        say(
                            f"runnerctl: {shown(path)} lagged, {event['dropped']} events "
                            "dropped; catching up",
                            err=True,
                        )
                        break
                    found.put((str(path), event))
            finally:
                conn.close()
    except DaemonUnavailable as exc:
        say(
            f"runnerctl: warning: {shown(path)}: {shown(exc.message)}; no longer followed", err=True
        )
    found.put((str(path), None))


def _dask_events(
    ctx: click.Context, filters: dict[str, Any], nodes: list[str] | None
) -> Iterator[tuple[str, Item]]:
    yield from dask_nodes.follow_nodes(
        ctx, {k: v for k, v in filters.items() if v is not None}, nodes
    )


def _folder_events(
    folder: Path, run: str | None, experiment: str | None
) -> Iterator[tuple[str, Item]]:
    """The mirrored records' new transitions, read again every FOLDER_POLL seconds; with
    RUN, from its first one."""
    seen: dict[tuple[str, str], int] = {}
    first = True
    while True:
        for record in read_folder(folder, quiet=not first).runs:
            if (run and not record["run_id"].startswith(run)) or (
                experiment and record["experiment"] != experiment
            ):
                continue
            where = (record["daemon"], record["run_id"])
            transitions = record.get("transitions") or []
            start = seen.get(where, 0 if run or not first else len(transitions))
            seen[where] = len(transitions)
            for t in transitions[start:]:
                yield (
                    record["daemon"],
                    {
                        "event": "transition",
                        "seq": t["seq"],
                        "run_id": record["run_id"],
                        "experiment": record["experiment"],
                        "variation": record["variation"],
                        "sweep_id": record.get("sweep_id"),
                        "at": t["at"],
                        "from": t["from"],
                        "to": t["to"],
                        "cause": t["cause"],
                        "source": t["source"],
                    },
                )
        first = False
        time.sleep(FOLDER_POLL)
