"""`runnerctl status`: one daemon's health, counts, active runs and latest failures
(`--watch` redraws it as runs change); of several daemons one section each, and of a
shared folder (`--from`) each mirrored node and export file, then the counts of all."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from runnerd.cli.common import (
    EXIT_ERROR,
    EXIT_UNREACHABLE,
    ago,
    cli,
    emit_json,
    fail,
    json_option,
    request,
    say,
    shown,
    span,
    subscribed,
    table,
)
from runnerd.cli.daemons import Answer
from runnerd.cli.merge import Item, counts_once, distinct_counts, merge_runs, total_counts
from runnerd.cli.nodes import ask_each, from_option, read_folder, several
from runnerd.cli.run_table import failure_line, runs_table, typed, typed_runs
from runnerd_client.connection import DaemonUnavailable
from runnerd_client.protocol import State, Status
from runnerd_client.replies import StatusInfo


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
    """One daemon's `status` reply, read as a StatusInfo (its `mirror` is not typed yet)."""
    status = typed(StatusInfo, body, "status")
    d = status.daemon
    lines = [
        f"runnerd {d.version} (pid {d.pid}), up {span(d.uptime_sec)}, {d.clients} client(s)",
        f"socket {d.socket}\nregistry {d.db} ({d.db_bytes / 1e6:.1f} MB)",
    ]
    if body.get("mirror"):
        lines.append(mirror_line(body["mirror"]))
    lines.append(f"\n{counts_line(status.counts)}")
    if status.active:
        lines += ["\nActive runs", runs_table(status.active, progress=True)]
    if status.failures:
        lines += [
            "\nLatest failures",
            table(
                ("RUN", "WHEN", "REASON", "FAILURE"),
                [(f.run_id, ago(f.at), f.reason, failure_line(f)) for f in status.failures],
            ),
        ]
    return "\n".join(lines)


def counts_line(counts: dict[str, int]) -> str:
    summary = ", ".join(f"{counts[s]} {s}" for s in State if counts.get(s))
    return f"{sum(counts.values())} run(s){': ' + summary if summary else ''}"


def status_many(ctx: click.Context, as_json: bool) -> None:
    """One section per daemon, an unreachable one said so, then the counts of all of them,
    each run once; exit 3 only when none answered."""
    answers = ask_each(ctx, Status(runs=True))
    counts = _counts_once(answers)
    if counts is None:  # a run two daemons know: which copy counts needs their times
        answers = ask_each(ctx, Status(runs=True, heard=True))
        counts = _counts_once(answers)
    answered = [a.body for a in answers if a.body is not None]
    if counts is None:
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


def _counts_once(answers: list[Answer]) -> dict[str, int] | None:
    """The counts of all the daemons that answered, each run once (None: see
    merge.counts_once); their `runs` are taken out of their replies."""
    bodies = [a.body for a in answers if a.body is not None]
    runs = [body.pop("runs", None) for body in bodies]
    counts = counts_once([r for r in runs if r is not None])
    if counts is None:
        return None
    older = [body["counts"] for body, r in zip(bodies, runs, strict=True) if r is None]
    return total_counts([counts, *older])  # a daemon older than `runs`: only added


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


def status_from(folder: Path, as_json: bool) -> None:
    """`status --from DIR`: each node (live, stopped or silent) and export file with its
    counts, then the counts of all of them, each run once."""

    got = read_folder(folder)
    counts = distinct_counts(got.runs)
    if as_json:
        emit_json({"counts": counts, "daemons": got.sources})
        return
    for source in got.sources:
        lines = [f"== {shown(source['daemon'])} =="]
        node = source["node"]
        lines.append(node_line(node) if node else "an export file")
        lines.append(counts_line(source["counts"]))
        active = [
            r
            for r in got.runs
            if r["daemon"] == source["daemon"] and r["state"] in ("pending", "running", "lost")
        ]
        if active:
            lines += [
                "Active runs (as last mirrored)",
                runs_table(typed_runs(merge_runs(active)[:10], "runs")),
            ]
        say("\n".join(lines) + "\n")
    say(f"All of {folder} ({len(got.sources)} source(s), each run once): {counts_line(counts)}")


def node_line(node: Item) -> str:
    """One mirrored node's state, as its node.json tells it."""

    who = f"{shown(node['host'])}: daemon pid {node['pid']}, registry {shown(node['db'])}"
    if node["state"] == "stopped":
        return f"{who}\nstopped cleanly {ago(node['stopped_at'])}, everything written"
    if node["state"] == "live":
        return f"{who}\nlive, mirrored {ago(node['refreshed_at'])}"
    return f"{who}\nSILENT since {ago(node['refreshed_at'])}: {shown(node['missing'])}"


def mirror_line(mirror: Item) -> str:
    """How a live daemon's mirror is doing, for `status`."""

    where = shown(mirror["node"] or mirror["folder"])
    waiting = f"{mirror['pending']} changed run(s) waiting"
    if mirror["state"] == "stalled":
        return (
            f"mirror {where}: STALLED, a write has not returned for "
            f"{mirror['writing_for_sec']:.0f} s; {waiting}; the daemon carries on"
        )
    if mirror["state"] == "behind":
        return (
            f"mirror {where}: BEHIND since {ago(mirror['failing_since'])}: "
            f"{shown(mirror['error'])}; {waiting}, to be written when it answers"
        )
    if mirror["state"] == "starting":
        return f"mirror {where}: starting; {waiting}"
    if mirror["pending"]:
        return f"mirror {where}: ok, {waiting} (last write {ago(mirror['refreshed_at'])})"
    return f"mirror {where}: up to date (written {ago(mirror['refreshed_at'])})"
